package gomerge

import (
	"fmt"
	"gomerge/gomerge/methods"
	"strings"
)

// FuseCard writes the README.md of a fused model: YAML metadata as the
// Hugging Face Hub expects it (base_model, tags), the base, the adapters
// with their weights, the method, and the tensors that changed.
func FuseCard(opts *FuseOptions, res *FuseResult) string {
	var b strings.Builder
	b.WriteString("---\n")
	fmt.Fprintf(&b, "base_model: %s\n", yamlString(res.Base))
	b.WriteString("library_name: transformers\ntags:\n- gomerge\n- lora\n- merge\n---\n\n")
	method := "applied as it is"
	switch {
	case res.CombinationType != "":
		method = fmt.Sprintf("merged first with `combination_type=%q`, then fused", res.CombinationType)
	case len(res.Adapters) > 1:
		method = "applied one after another (stack)"
	}
	fmt.Fprintf(&b, "# Fused model\n\n`%s` with its LoRA adapter(s) fused into the weights by "+
		"[gomerge](https://pypi.org/project/gomerge/) %s: W' = W + s B A per adapted layer, as PEFT's "+
		"`merge_and_unload()` computes it, summed in float32 and rounded once to each tensor's dtype.\n\n", res.Base, Version)
	fmt.Fprintf(&b, "## Adapters\n\nMethod: %s.\n\n", method)
	if m, err := methods.LookupMethod(res.CombinationType); err == nil && res.CombinationType != "" {
		for _, line := range opts.Combine.CardLines(m) { // the merge's parameters, from the schema
			b.WriteString(line + "\n")
		}
		b.WriteString("\n")
	}
	b.WriteString("| adapter | weight |\n|---|---|\n")
	for i, a := range res.Adapters {
		w := "1"
		if i < len(opts.Weights) {
			if opts.Weights[i].PerModule() {
				w = "per module"
			} else {
				w = fmt.Sprintf("%g", opts.Weights[i].Value)
			}
		}
		fmt.Fprintf(&b, "| %s | %s |\n", mdCode(a), w)
	}
	if res.Untied {
		b.WriteString("\nThe adapters change a matrix tied to another (`tie_word_embeddings`): both are written and the " +
			"config is untied, so that the model reloads as fused.\n")
	}
	fmt.Fprintf(&b, "\n## Changed tensors\n\n%d of %d tensors differ from the base.\n\n| tensor | shape | what |\n|---|---|---|\n",
		len(res.Changed), res.Tensors)
	for _, c := range res.Changed {
		fmt.Fprintf(&b, "| %s | %v | %s |\n", mdCode(c.Tensor), c.Shape, strings.Join(c.Ops, ", "))
	}
	return b.String()
}
