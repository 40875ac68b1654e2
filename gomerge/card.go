package gomerge

import (
	"fmt"
	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/methods"
	"sort"
	"strings"
)

// Version is gomerge's version, shared by the engine and the Python package.
const Version = "0.1.0"

// ModelCard writes the README.md of a merged adapter: YAML metadata as the
// Hugging Face Hub expects it (base_model, library_name: peft, tags), the
// sources and weights, the method and its options, the seed, the gomerge
// version and a usage snippet.
func ModelCard(opts Options, res *Result, baseModel string, sources []string) string {
	var b strings.Builder
	b.WriteString("---\n")
	if baseModel != "" {
		fmt.Fprintf(&b, "base_model: %s\n", yamlString(baseModel))
	}
	b.WriteString("library_name: peft\ntags:\n- gomerge\n- lora\n- merge\n")
	fmt.Fprintf(&b, "- %s\n---\n\n", res.CombinationType)
	name := res.AdapterName
	if name == "" {
		name = "merged adapter"
	}
	fmt.Fprintf(&b, "# %s\n\nA LoRA adapter merged by [gomerge](https://pypi.org/project/gomerge/) %s with PEFT's "+
		"`add_weighted_adapter` semantics (`combination_type=%q`).\n\n", name, Version, res.CombinationType)
	b.WriteString("## Sources\n\n| adapter | weight |\n|---|---|\n")
	perModule := false
	for i, s := range sources {
		if w := opts.Weights[i]; w.PerModule() {
			perModule = true
			fmt.Fprintf(&b, "| `%s` | per module (below) |\n", s)
		} else {
			fmt.Fprintf(&b, "| `%s` | %g |\n", s, w.Value)
		}
	}
	if perModule {
		b.WriteString("\n## Per-module weights\n\nEach module takes the weight of the first pattern that matches the end " +
			"of its name (PEFT's `rank_pattern` rule); a gradient is interpolated linearly over the layer index, from " +
			"layer 0 to the last layer.\n")
		for i, s := range sources {
			w := opts.Weights[i]
			if !w.PerModule() {
				continue
			}
			fmt.Fprintf(&b, "\n`%s`:\n\n| pattern | weight |\n|---|---|\n", s)
			for _, p := range w.Patterns {
				fmt.Fprintf(&b, "| %s | %s |\n", mdCode(p.Pattern), weightText(p))
			}
		}
	}
	b.WriteString("\n## Options\n\n")
	fmt.Fprintf(&b, "- combination_type: `%s`\n- rank: %d\n- dtype: %s\n", res.CombinationType, res.Rank, res.DType)
	method, _ := methods.LookupMethod(res.CombinationType)
	for _, line := range opts.CardLines(method) { // from the parameter schema
		b.WriteString(line + "\n")
	}
	if res.Seed != nil {
		fmt.Fprintf(&b, "- seed: %d (pass it back as `seed=` to reproduce this merge byte for byte)\n", *res.Seed)
	}
	writeRankTable(&b, res.Rank, res.ModuleRanks, res.ModuleErrors)
	base := baseModel
	if base == "" {
		base = "<base model>"
	}
	fmt.Fprintf(&b, "\n## Usage\n\n```python\nfrom peft import PeftModel\nfrom transformers import AutoModelForCausalLM\n\n"+
		"base = AutoModelForCausalLM.from_pretrained(%q)\nmodel = PeftModel.from_pretrained(base, %q)\n```\n", base, opts.OutputDir)
	return b.String()
}

// weightText shows a pattern's weight: a number or a gradient.
func weightText(p adapter.WeightPattern) string {
	if p.Gradient == nil {
		return fmt.Sprintf("%g", p.Weight)
	}
	vals := make([]string, len(p.Gradient))
	for i, v := range p.Gradient {
		vals[i] = fmt.Sprintf("%g", v)
	}
	return "gradient [" + strings.Join(vals, ", ") + "]"
}

// mdCode shows s as inline code inside a Markdown table cell: a fence longer
// than any run of backticks in s, and pipes escaped (GitHub's tables split
// cells at them, code spans included).
func mdCode(s string) string {
	run, longest := 0, 0
	for _, c := range s {
		if c == '`' {
			run++
			longest = max(longest, run)
		} else {
			run = 0
		}
	}
	fence := strings.Repeat("`", longest+1)
	if longest > 0 {
		s = " " + s + " "
	}
	return fence + strings.ReplaceAll(s, "|", `\|`) + fence
}

// yamlString quotes s for YAML when it is not a plain scalar.
func yamlString(s string) string {
	if s == "" || strings.ContainsAny(s, ":#{}[],&*?|<>=!%@`'\"\n") || strings.TrimSpace(s) != s {
		return fmt.Sprintf("%q", s)
	}
	return s
}

// writeRankTable lists each module's rank and the relative error of its
// factorisation, when the merge chose ranks per module or factorised the
// combined updates.
func writeRankTable(b *strings.Builder, rank int, moduleRanks map[string]int, moduleErrors map[string]float64) {
	if len(moduleErrors) == 0 && !mixedRanks(moduleRanks) {
		return
	}
	names := make([]string, 0, len(moduleRanks))
	for name := range moduleRanks {
		names = append(names, name)
	}
	sort.Strings(names)
	worst := 0.0
	for _, e := range moduleErrors {
		worst = max(worst, e)
	}
	fmt.Fprintf(b, "\n## Ranks\n\nr = %d; largest relative error ||D - B'A'|| / ||D|| of a module: %.3g.\n\n"+
		"| module | rank | relative error |\n|---|---|---|\n", rank, worst)
	for _, name := range names {
		e := "-"
		if v, ok := moduleErrors[name]; ok {
			e = fmt.Sprintf("%.3g", v)
		}
		fmt.Fprintf(b, "| `%s` | %d | %s |\n", name, moduleRanks[name], e)
	}
}

func mixedRanks(ranks map[string]int) bool {
	first := -1
	for _, r := range ranks {
		if first >= 0 && r != first {
			return true
		}
		first = r
	}
	return false
}

// writeConfigAndCard writes adapter_config.json (with a rank pattern for
// modules whose rank differs) and, unless turned off, the README.md card.
func writeConfigAndCard(out *atomicdir.Output, opts Options, res *Result, base *adapter.Config, targets adapter.TargetModules, pattern adapter.Patterns) error {
	cfgJSON, err := adapter.MergedConfigJSON(base, res.Rank, targets, pattern, append(adapter.Patterns(nil), pattern...), nil)
	if err != nil {
		return err
	}
	if err := out.WriteFile(adapter.ConfigFile, cfgJSON); err != nil {
		return err
	}
	if opts.ModelCard != nil && !*opts.ModelCard {
		return nil
	}
	names := opts.SourceNames
	if len(names) != len(opts.Adapters) {
		names = opts.Adapters
	}
	return out.WriteFile("README.md", []byte(ModelCard(opts, res, base.BaseModel, names)))
}
