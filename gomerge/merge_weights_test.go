package gomerge

import (
	"context"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/methods"
)

func perModule(pairs ...any) adapter.Weight {
	w := adapter.Weight{Patterns: []adapter.WeightPattern{}}
	for i := 0; i < len(pairs); i += 2 {
		p := adapter.WeightPattern{Pattern: pairs[i].(string)}
		switch v := pairs[i+1].(type) {
		case float64:
			p.Weight = v
		case []float64:
			p.Gradient = v
		}
		w.Patterns = append(w.Patterns, p)
	}
	return w
}

// writeLayered writes n adapters of two layers with attention and MLP modules.
func writeLayered(t *testing.T, root string, n int) ([]string, []string) {
	rng := rand.New(rand.NewPCG(11, 12))
	names := []string{"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.up_proj",
		"model.layers.1.self_attn.q_proj", "model.layers.1.mlp.up_proj"}
	var dirs []string
	for i := range n {
		mods := map[string]testutil.Module{}
		for _, name := range names {
			mods[name] = testutil.Module{A: testutil.RandTensor(rng, 4, 6), B: testutil.RandTensor(rng, 5, 4)}
		}
		cfg := map[string]any{"target_modules": []string{"q_proj", "up_proj"}, "lora_alpha": 4 * (i + 1)}
		dirs = append(dirs, testutil.WriteAdapter(t, filepath.Join(root, string(rune('a'+i))), cfg, mods))
	}
	return dirs, names
}

func TestMergePerModuleWeights(t *testing.T) {
	root := t.TempDir()
	dirs, names := writeLayered(t, root, 2)
	weights := adapter.Weights{
		perModule(`self_attn\..*`, 1.0, `mlp\..*`, 0.0),
		perModule(`layers\.0\.self_attn\..*`, 0.0, `.*`, []float64{0.5, 2}),
	}
	want := func(i int, module string) float64 { // the weights above, resolved by hand (2 layers)
		attn, layer1 := strings.Contains(module, "self_attn"), strings.Contains(module, "layers.1.")
		switch {
		case i == 0 && attn:
			return 1
		case i == 0:
			return 0
		case !layer1 && attn:
			return 0
		case layer1:
			return 2
		}
		return 0.5
	}
	for _, ct := range []string{"cat", "task_arithmetic", "svd"} {
		t.Run(ct, func(t *testing.T) {
			out := filepath.Join(root, "out-"+ct)
			combine := methods.Combine{CombinationType: ct, SVDRank: &linalg.RankSpec{Fixed: 8}}
			if ct == "cat" {
				combine.SVDRank = nil // cat takes no svd_rank; its rank is the sum of the ranks, 8
			}
			_, err := Merge(context.Background(), Options{Adapters: dirs, Weights: weights, OutputDir: out, Combine: combine}, nil)
			require.NoError(t, err) // svd_rank 8 = the sum of the ranks: task_arithmetic and svd stay exact
			merged, err := adapter.Load(out)
			require.NoError(t, err)
			srcs := make([]*adapter.Adapter, len(dirs))
			for i, d := range dirs {
				srcs[i], err = adapter.Load(d)
				require.NoError(t, err)
			}
			for _, name := range names {
				expect := make([]float64, 5*6)
				for i, src := range srcs {
					m := src.Modules[name]
					a, b, err := m.Factors()
					require.NoError(t, err)
					for k, v := range testutil.Product(a, b, 5, 4, 6) {
						expect[k] += want(i, name) * m.Scaling * v
					}
				}
				mm := merged.Modules[name]
				a, b, err := mm.Factors()
				require.NoError(t, err)
				got := testutil.Product(a, b, 5, mm.Rank, 6)
				for k := range expect {
					assert.InDelta(t, expect[k], got[k], 1e-4, "%s [%d]", name, k)
				}
			}
			card, err := os.ReadFile(filepath.Join(out, "README.md"))
			require.NoError(t, err)
			assert.Contains(t, string(card), "per module (below)")
			assert.Contains(t, string(card), "| `self_attn\\..*` | 1 |")
			assert.Contains(t, string(card), "| `.*` | gradient [0.5, 2] |")
		})
	}
}

func TestMergePerModuleWeightErrorsWriteNothing(t *testing.T) {
	root := t.TempDir()
	dirs, _ := writeLayered(t, root, 2)
	tests := []struct {
		name    string
		weights adapter.Weights
		want    string
	}{
		{"unmatched", adapter.Weights{{Value: 1}, perModule(`self_attn\..*`, 1.0)},
			"weights[1]: module model.layers.0.mlp.up_proj of adapter 1 (" + dirs[1] + ") matches none of its patterns"},
		{"bad regex", adapter.Weights{perModule("[", 1.0), {Value: 1}}, `weights[0]: pattern "["`},
		{"nan", adapter.Weights{{Value: 1}, perModule(".*", math.NaN())}, "weights[1]"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			out := filepath.Join(root, "out-"+tc.name)
			_, err := Merge(context.Background(), Options{Adapters: dirs, Weights: tc.weights, OutputDir: out, Combine: methods.Combine{CombinationType: "cat"}}, nil)
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			assert.Contains(t, err.Error(), tc.want)
			assert.NoDirExists(t, out)
		})
	}
	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	for _, e := range entries {
		assert.NotContains(t, e.Name(), atomicdir.TmpPrefix, "temporary folder left behind")
	}
}

func TestValidateDoesNotWriteIntoTheCallersWeights(t *testing.T) {
	w := adapter.Weights{perModule(".*", 1.0)}
	opts := Options{Adapters: []string{"a"}, Weights: w, OutputDir: "o"}
	require.NoError(t, opts.validate())
	assert.False(t, w[0].Patterns[0].Compiled())
	assert.True(t, opts.Weights[0].Patterns[0].Compiled())
}

func TestPatternsThatGiveNoModuleTheirWeightWarn(t *testing.T) {
	root := t.TempDir()
	dirs, _ := writeLayered(t, root, 2)
	weights := adapter.Weights{
		perModule(`self_attn`, 1.0, `.*`, 0.0),                                  // inside the names, not at their end
		perModule(`mlp\..*`, 1.0, `.*`, 0.5, `layers\.0\..*`, 2.0, `nope`, 3.0), // shadowed by '.*'; matches nothing
	}
	res, err := Merge(context.Background(), Options{Adapters: dirs, Weights: weights, OutputDir: filepath.Join(root, "out"), Combine: methods.Combine{CombinationType: "cat"}}, nil)
	require.NoError(t, err)
	require.Len(t, res.Warnings, 3, res.Warnings)
	assert.Contains(t, res.Warnings[0], "weights[0]: pattern 'self_attn' matches no module of adapter 0 ("+dirs[0]+")")
	assert.Contains(t, res.Warnings[0], "write '.*self_attn.*' to match it anywhere")
	assert.Contains(t, res.Warnings[1], `weights[1]: pattern 'layers\.0\..*' gives no module of adapter 1`)
	assert.Contains(t, res.Warnings[2], "weights[1]: pattern 'nope' matches no module of adapter 1")
	res, err = Merge(context.Background(), Options{Adapters: dirs, Weights: adapter.Weights{perModule(`self_attn\..*`, 1.0, `.*`, 0.0), {Value: 1}}, OutputDir: filepath.Join(root, "used"), Combine: methods.Combine{CombinationType: "cat"}}, nil)
	require.NoError(t, err)
	assert.Empty(t, res.Warnings)
}
