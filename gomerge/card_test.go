package gomerge

import (
	"gomerge/gomerge/adapter"
	"gomerge/gomerge/methods"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestModelCard(t *testing.T) {
	density, seed := 0.2, uint64(42)
	opts := Options{Weights: adapter.ScalarWeights(2, 1), OutputDir: "merged", Combine: methods.Combine{Density: &density, MajoritySignMethod: "total"}}
	res := &Result{AdapterName: "merge", CombinationType: "dare_ties", Rank: 8, DType: "bfloat16", Seed: &seed}
	card := ModelCard(opts, res, "org/base: v1", []string{"user/a", "dir/b"})
	front := strings.SplitN(card, "---\n", 3)[1]
	assert.Contains(t, front, `base_model: "org/base: v1"`) // quoted: it holds a colon
	assert.Contains(t, front, "library_name: peft")
	assert.Contains(t, front, "- dare_ties")
	for _, want := range []string{"| `user/a` | 2 |", "| `dir/b` | 1 |", "density: 0.2", "majority_sign_method: total",
		"seed: 42", `PeftModel.from_pretrained(base, "merged")`, `from_pretrained("org/base: v1")`} {
		assert.Contains(t, card, want)
	}
	assert.NotContains(t, card, "## Ranks")
	res.ModuleRanks = map[string]int{"m.q": 8, "m.v": 3}
	res.ModuleErrors = map[string]float64{"m.q": 0, "m.v": 0.125}
	ranked := ModelCard(opts, res, "", []string{"a", "b"})
	assert.Contains(t, ranked, "largest relative error ||D - B'A'|| / ||D|| of a module: 0.125")
	assert.Contains(t, ranked, "| `m.v` | 3 | 0.125 |")
	plain := ModelCard(Options{Weights: adapter.ScalarWeights(1), OutputDir: "o"}, &Result{CombinationType: "svd"}, "", []string{"a"})
	assert.NotContains(t, plain, "base_model:")
	assert.NotContains(t, plain, "seed:")
}

func TestModelCardPerModuleWeights(t *testing.T) {
	opts := Options{OutputDir: "merged", Weights: adapter.Weights{
		perModule(`self_attn\..*`, 1.0, `mlp\..*|lm_head`, 0.0),
		{Value: 0.5},
		perModule("a`b", []float64{0, 0.25, 1}),
	}}
	card := ModelCard(opts, &Result{CombinationType: "cat"}, "", []string{"attn", "plain", "odd"})
	for _, want := range []string{
		"| `attn` | per module (below) |", "| `plain` | 0.5 |", "## Per-module weights", "first pattern that matches",
		"`attn`:\n\n| pattern | weight |\n|---|---|\n| `self_attn\\..*` | 1 |\n| `mlp\\..*\\|lm_head` | 0 |\n",
		"| `` a`b `` | gradient [0, 0.25, 1] |",
	} {
		assert.Contains(t, card, want)
	}
	assert.NotContains(t, card, "`plain`:")
	assert.NotContains(t, ModelCard(Options{Weights: adapter.ScalarWeights(1), OutputDir: "o"}, &Result{CombinationType: "svd"}, "", []string{"a"}), "Per-module")
}
