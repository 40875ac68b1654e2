package fuse

import (
	"fmt"
	"strings"

	"gomerge/gomerge/card"
	"gomerge/gomerge/methods"
)

// ModelCard writes the README.md of a fused model: YAML metadata as the
// Hugging Face Hub expects it (base_model, tags), the base, the adapters
// with their weights, the method, and the tensors that changed.
func ModelCard(opts *Options, res *Result) string {
	method := "applied as it is"
	switch {
	case res.CombinationType != "":
		method = fmt.Sprintf("merged first with `combination_type=%q`, then fused", res.CombinationType)
	case len(res.Adapters) > 1:
		method = "applied one after another (stack)"
	}
	c := &card.Card{
		BaseModel: res.Base, Library: "transformers", Tags: []string{"gomerge", "lora", "merge"}, Title: "Fused model",
		Intro: fmt.Sprintf("`%s` with its LoRA adapter(s) fused into the weights by %s %s: W' = W + s B A per adapted layer, "+
			"as PEFT's `merge_and_unload()` computes it, summed in float32 and rounded once to each tensor's dtype.",
			res.Base, card.Link, card.Version),
	}
	ad := c.Section("Adapters")
	ad.Printf("Method: %s.\n\n", method)
	if m, err := methods.LookupMethod(res.CombinationType); err == nil && res.CombinationType != "" {
		ad.Lines(opts.Combine.CardLines(m)) // the merge's parameters, from the schema
		ad.Text("\n")
	}
	ad.Table("adapter", "weight")
	for i, a := range res.Adapters {
		w := "1"
		if i < len(opts.Weights) {
			if opts.Weights[i].PerModule() {
				w = "per module"
			} else {
				w = fmt.Sprintf("%g", opts.Weights[i].Value)
			}
		}
		ad.Row(card.Code(a), w)
	}
	if res.Untied {
		ad.Text("\nThe adapters change a matrix tied to another (`tie_word_embeddings`): both are written and the " +
			"config is untied, so that the model reloads as fused.\n")
	}
	ch := c.Section("Changed tensors")
	ch.Printf("%d of %d tensors differ from the base.\n\n", len(res.Changed), res.Tensors)
	ch.Table("tensor", "shape", "what")
	for _, t := range res.Changed {
		ch.Row(card.Code(t.Tensor), fmt.Sprint(t.Shape), strings.Join(t.Ops, ", "))
	}
	quantCardSection(c, res)
	return c.String()
}
