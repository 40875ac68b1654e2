package gomerge

import (
	"fmt"
	"sort"
	"strings"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/card"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/methods"
)

// Version is gomerge's version, shared by the engine and the Python package.
const Version = card.Version

// ModelCard writes the README.md of a merged adapter: YAML metadata as the
// Hugging Face Hub expects it (base_model, library_name: peft, tags), the
// sources and weights, the method and its options, the seed, the gomerge
// version and a usage snippet.
func ModelCard(opts Options, res *Result, baseModel string, sources []string) string {
	name := res.AdapterName
	if name == "" {
		name = "merged adapter"
	}
	c := &card.Card{
		BaseModel: baseModel, Library: "peft", Tags: []string{"gomerge", "lora", "merge", res.CombinationType}, Title: name,
		Intro: fmt.Sprintf("A LoRA adapter merged by %s %s with PEFT's `add_weighted_adapter` semantics (`combination_type=%q`).",
			card.Link, card.Version, res.CombinationType),
	}
	src := c.Section("Sources")
	src.Table("adapter", "weight")
	perModule := false
	for i, s := range sources {
		if w := opts.Weights[i]; w.PerModule() {
			perModule = true
			src.Row("`"+s+"`", "per module (below)")
		} else {
			src.Row("`"+s+"`", fmt.Sprintf("%g", w.Value))
		}
	}
	if perModule {
		pm := c.Section("Per-module weights")
		pm.Text("Each module takes the weight of the first pattern that matches the end of its name (PEFT's `rank_pattern` " +
			"rule); a gradient is interpolated linearly over the layer index, from layer 0 to the last layer.\n")
		for i, s := range sources {
			w := opts.Weights[i]
			if !w.PerModule() {
				continue
			}
			pm.Printf("\n`%s`:\n\n", s)
			pm.Table("pattern", "weight")
			for _, p := range w.Patterns {
				pm.Row(card.Code(p.Pattern), weightText(p))
			}
		}
	}
	o := c.Section("Options")
	o.Printf("- combination_type: `%s`\n- rank: %d\n- dtype: %s\n", res.CombinationType, res.Rank, res.DType)
	method, _ := methods.LookupMethod(res.CombinationType)
	o.Lines(opts.CardLines(method)) // from the parameter schema
	if res.Seed != nil {
		o.Printf("- seed: %d (pass it back as `seed=` to reproduce this merge byte for byte)\n", *res.Seed)
	}
	c.RankTable(res.Rank, res.ModuleRanks, res.ModuleErrors)
	expertsSection(c, res)
	base := baseModel
	if base == "" {
		base = "<base model>"
	}
	c.PeftUsage(base, opts.OutputDir)
	return c.String()
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

// writeConfigAndCard writes adapter_config.json (with a rank pattern for
// modules whose rank differs) and, unless turned off, the README.md card.
func writeConfigAndCard(out *atomicdir.Output, opts Options, res *Result, base *adapter.Config, targets adapter.TargetModules, params []string, pattern adapter.Patterns) error {
	var extra map[string]any
	if params != nil {
		extra = map[string]any{"target_parameters": params}
	}
	cfgJSON, err := adapter.MergedConfigJSON(base, res.Rank, targets, pattern, append(adapter.Patterns(nil), pattern...), extra)
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

// expertsSection lists the mixture-of-experts parameters of the merge
// (target_parameters) and says what was done per expert.
func expertsSection(c *card.Card, res *Result) {
	if len(res.ModuleExperts) == 0 {
		return
	}
	s := c.Section("Mixture-of-experts parameters")
	s.Text("These modules adapt expert parameters (PEFT's `target_parameters`). Each expert's update was merged as a " +
		"low-rank matrix of its own (sign election, pruning and truncation per expert); ranks are per expert, " +
		"as PEFT's `r` is.\n\n")
	s.Table("module", "parameter", "experts", "rank per expert")
	names := make([]string, 0, len(res.ModuleExperts))
	for n := range res.ModuleExperts {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, n := range names {
		e := res.ModuleExperts[n]
		s.Row(card.Code(n), card.Code(e.Param), fmt.Sprint(e.Experts), fmt.Sprint(res.ModuleRanks[n]))
	}
}
