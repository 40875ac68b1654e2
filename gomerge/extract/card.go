package extract

// The model card of an extracted adapter.

import (
	"fmt"
	"path/filepath"

	"gomerge/gomerge/card"
	"gomerge/gomerge/linalg"
)

// extractCard is the README.md of an extracted adapter: the Hub's
// metadata, the models, the options, each module's rank and relative
// error, the modules saved whole and those skipped as unchanged.
func extractCard(opts Options, rule linalg.RankRule, res *Result) string {
	baseName, ftName := opts.BaseName, opts.FinetunedName
	if baseName == "" {
		baseName = opts.Base
	}
	if ftName == "" {
		ftName = opts.Finetuned
	}
	c := &card.Card{
		BaseModel: baseName, Library: "peft", Tags: []string{"gomerge", "lora", "extracted"},
		Title: filepath.Base(filepath.Clean(opts.OutputDir)),
		Intro: fmt.Sprintf("A LoRA adapter extracted by %s %s from the difference between the fine-tuned model `%s` and its "+
			"base `%s`: each linear module's update dW = W_ft - W_base (float32) is factorised as B A by a seeded randomized "+
			"SVD (B = U S, A = V^T; lora_alpha = r, so that the scaling is 1).", card.Link, card.Version, ftName, baseName),
	}
	o := c.Section("Options")
	if rule.Fixed > 0 {
		o.Printf("- rank: %d\n", rule.Fixed)
	} else {
		o.Printf("- energy: %g (each module keeps that fraction of ||dW||^2)\n", rule.Energy)
	}
	if rule.Max > 0 {
		o.Printf("- max_rank: %d\n", rule.Max)
	}
	o.Printf("- dtype: %s\n- seed: %d (the same seed gives the same bytes)\n", res.DType, res.Seed)
	if len(res.ModulesToSave) > 0 {
		c.Section("Modules saved whole (modules_to_save)").List(res.ModulesToSave)
	}
	if len(res.Unchanged) > 0 {
		c.Section("Unchanged linear modules (dW = 0, skipped)").List(res.Unchanged)
	}
	for _, w := range res.Warnings {
		c.Section("").Printf("Note: %s\n", w)
	}
	c.RankTable(res.Rank, res.ModuleRanks, res.ModuleErrors)
	c.PeftUsage(baseName, opts.OutputDir)
	return c.String()
}
