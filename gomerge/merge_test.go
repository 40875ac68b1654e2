package gomerge

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/parallel"
)

func writeThree(t *testing.T, root string) []string {
	rng := rand.New(rand.NewPCG(5, 6))
	mods := func(names ...string) map[string]testutil.Module {
		m := map[string]testutil.Module{}
		for _, n := range names {
			m[n] = testutil.Module{A: testutil.RandTensor(rng, 4, 6), B: testutil.RandTensor(rng, 5, 4)}
		}
		return m
	}
	return []string{
		testutil.WriteAdapter(t, filepath.Join(root, "a"), map[string]any{"target_modules": []string{"q", "v"}, "custom": 1}, mods("m.q", "m.v")),
		testutil.WriteAdapter(t, filepath.Join(root, "b"), map[string]any{"target_modules": []string{"v", "k"}}, mods("m.v", "m.k")),
		testutil.WriteAdapter(t, filepath.Join(root, "c"), map[string]any{"target_modules": []string{"q"}, "lora_alpha": 2}, mods("m.q")),
	}
}

func TestMergeEndToEnd(t *testing.T) {
	root := t.TempDir()
	dirs := writeThree(t, root)
	for _, ct := range []string{"linear", "cat", "svd"} {
		t.Run(ct, func(t *testing.T) {
			out := filepath.Join(root, "out-"+ct)
			var p parallel.Progress
			res, err := Merge(context.Background(), Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 2, -1), OutputDir: out, Combine: methods.Combine{CombinationType: ct}}, &p)
			require.NoError(t, err)
			assert.Equal(t, 3, res.Modules)
			assert.Equal(t, int64(3), p.Done.Load())
			merged, err := adapter.Load(out)
			require.NoError(t, err)
			assert.ElementsMatch(t, []string{"m.q", "m.v", "m.k"}, merged.Order)
			assert.Equal(t, map[string]int{"linear": 4, "cat": 12, "svd": 4}[ct], merged.Config.R)
			assert.Equal(t, []string{"k", "q", "v"}, merged.Config.TargetModules.Names)
			assert.Contains(t, merged.Config.Raw, "custom")
			if ct == "cat" {
				// cat is exact: B'A' of m.k is 2 * s_b * B_b A_b (only adapter b has it)
				src, _ := adapter.Load(dirs[1])
				sa, sb, err := src.Modules["m.k"].Factors()
				require.NoError(t, err)
				ma, mb, err := merged.Modules["m.k"].Factors()
				require.NoError(t, err)
				want := testutil.Product(sa, sb, 5, 4, 6)
				got := testutil.Product(ma, mb, 5, 12, 6)
				for i := range want {
					assert.InDelta(t, 2*2*want[i], got[i], 1e-4)
				}
			}
		})
	}
	entries, err := os.ReadDir(root)
	require.NoError(t, err)
	for _, e := range entries {
		assert.NotContains(t, e.Name(), atomicdir.TmpPrefix, "temporary folder left behind")
	}
}

func TestMergeLinearWritesRankPatternForSmallerModules(t *testing.T) {
	root := t.TempDir()
	rng := rand.New(rand.NewPCG(7, 8))
	cfg := map[string]any{"r": 4, "rank_pattern": map[string]int{"q": 2}, "target_modules": []string{"q", "v"}}
	mods := func() map[string]testutil.Module {
		return map[string]testutil.Module{
			"m.q": {A: testutil.RandTensor(rng, 2, 6), B: testutil.RandTensor(rng, 5, 2)},
			"m.v": {A: testutil.RandTensor(rng, 4, 6), B: testutil.RandTensor(rng, 5, 4)},
		}
	}
	dirs := []string{testutil.WriteAdapter(t, filepath.Join(root, "a"), cfg, mods()), testutil.WriteAdapter(t, filepath.Join(root, "b"), cfg, mods())}
	out := filepath.Join(root, "out")
	_, err := Merge(context.Background(), Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1), OutputDir: out, Combine: methods.Combine{CombinationType: "linear"}}, nil)
	require.NoError(t, err)
	raw, err := os.ReadFile(filepath.Join(out, adapter.ConfigFile))
	require.NoError(t, err)
	var c map[string]any
	require.NoError(t, json.Unmarshal(raw, &c))
	assert.Equal(t, map[string]any{`m\.q`: 2.0}, c["rank_pattern"])
	assert.Equal(t, map[string]any{`m\.q`: 2.0}, c["alpha_pattern"])
	merged, err := adapter.Load(out) // the rank check in LoadAdapter passes only with a correct rank_pattern
	require.NoError(t, err)
	assert.Equal(t, 2, merged.Modules["m.q"].Rank)
	assert.Equal(t, 1.0, merged.Modules["m.q"].Scaling)
}

func TestMergeErrors(t *testing.T) {
	root := t.TempDir()
	dirs := writeThree(t, root)
	rng := rand.New(rand.NewPCG(9, 9))
	bad := testutil.WriteAdapter(t, filepath.Join(root, "bad"), nil, map[string]testutil.Module{"m.q": {A: testutil.RandTensor(rng, 4, 7), B: testutil.RandTensor(rng, 5, 4)}})
	r8 := testutil.WriteAdapter(t, filepath.Join(root, "r8"), map[string]any{"r": 8}, map[string]testutil.Module{"m.q": {A: testutil.RandTensor(rng, 8, 6), B: testutil.RandTensor(rng, 5, 8)}})
	existing := filepath.Join(root, "exists")
	require.NoError(t, os.MkdirAll(existing, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(existing, "notes.txt"), []byte("keep me"), 0o644))
	one := 1
	neg := -1
	tests := []struct {
		name string
		opts Options
		kind errs.ErrKind
		want string
	}{
		{"weights length", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1)}, errs.KindValue, "got 1 weights for 3 adapters"},
		{"unknown type", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), Combine: methods.Combine{CombinationType: "avg"}}, errs.KindValue, `invalid value "avg"`},
		{"missing dir", Options{Adapters: []string{dirs[0], filepath.Join(root, "nope")}, Weights: adapter.ScalarWeights(1, 1)}, errs.KindFileNotFound, "nope"},
		{"shape mismatch", Options{Adapters: []string{dirs[0], bad}, Weights: adapter.ScalarWeights(1, 1)}, errs.KindValue, "module m.q: shapes differ"},
		{"unequal ranks for linear", Options{Adapters: []string{dirs[0], r8}, Weights: adapter.ScalarWeights(1, 1), Combine: methods.Combine{CombinationType: "linear"}}, errs.KindValue, "same r value"},
		{"existing output", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), OutputDir: existing}, errs.KindFileExists, "already exists"},
		{"overwrite non-adapter", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), OutputDir: existing, Overwrite: true}, errs.KindFileExists, "not an adapter"},
		{"output is input", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), OutputDir: dirs[1]}, errs.KindValue, "also an input"},
		{"svd rank", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), Combine: methods.Combine{SVDRank: &linalg.RankSpec{Fixed: neg}}}, errs.KindValue, "svd_rank"},
		{"energy for a factor-wise type", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), Combine: methods.Combine{CombinationType: "linear", SVDRank: &linalg.RankSpec{Energy: 0.9}}}, errs.KindValue, `svd_rank: combination_type "linear" does not take svd_rank`},
		{"energy for a pruned svd type", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), Combine: methods.Combine{CombinationType: "ties_svd", Density: new(0.5), SVDRank: &linalg.RankSpec{Energy: 0.9}}}, errs.KindValue, "randomized SVD"},
		{"max rank for cat", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), Combine: methods.Combine{CombinationType: "cat", MaxRank: &one}}, errs.KindValue, "does not take max_rank"},
		{"max rank zero", Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), Combine: methods.Combine{MaxRank: new(0)}}, errs.KindValue, "max_rank"},
		{"duplicate", Options{Adapters: []string{dirs[0], dirs[0]}, Weights: adapter.ScalarWeights(1, 1), Combine: methods.Combine{SVDRank: &linalg.RankSpec{Fixed: one}}}, errs.KindValue, "listed twice"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if tc.opts.OutputDir == "" {
				tc.opts.OutputDir = filepath.Join(root, "out-"+tc.name)
			}
			_, err := Merge(context.Background(), tc.opts, nil)
			require.Error(t, err)
			assert.Equal(t, tc.kind, errs.KindOf(err), err.Error())
			assert.Contains(t, err.Error(), tc.want)
			if tc.opts.OutputDir != existing && tc.opts.OutputDir != dirs[1] {
				assert.NoDirExists(t, tc.opts.OutputDir)
			}
		})
	}
	notes, err := os.ReadFile(filepath.Join(existing, "notes.txt"))
	require.NoError(t, err)
	assert.Equal(t, "keep me", string(notes))
}

func TestMergeCancelled(t *testing.T) {
	root := t.TempDir()
	dirs := writeThree(t, root)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	out := filepath.Join(root, "out")
	_, err := Merge(ctx, Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), OutputDir: out}, nil)
	require.ErrorIs(t, err, errs.ErrCancelled)
	assert.NoDirExists(t, out)
}

func TestMergeOverwriteReplacesAdapter(t *testing.T) {
	root := t.TempDir()
	dirs := writeThree(t, root)
	out := filepath.Join(root, "out")
	for _, ct := range []string{"cat", "svd"} {
		_, err := Merge(context.Background(), Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1), OutputDir: out, Overwrite: true, Combine: methods.Combine{CombinationType: ct}}, nil)
		require.NoError(t, err)
	}
	merged, err := adapter.Load(out)
	require.NoError(t, err)
	assert.Equal(t, 4, merged.Config.R) // the svd merge replaced the cat one
}

func TestPlanWorkersRefusesWhatCannotFit(t *testing.T) {
	mod := &adapter.Module{Rank: 16}
	big := methods.ModuleJob{Name: "m.big", In: 11008, Out: 4096, Srcs: []methods.Source{{Mod: mod}, {Mod: mod}, {Mod: mod}}}
	opts := Options{Combine: methods.Combine{CombinationType: "ties_svd", Density: new(0.2)}}
	require.NoError(t, opts.Validate())
	need := opts.Method().Memory(&big, &opts.Combine) // about 540 MB
	_, err := planWorkers(opts, []methods.ModuleJob{big}, need/2)
	require.Error(t, err)
	assert.Contains(t, err.Error(), "module m.big")
	assert.Contains(t, err.Error(), "GiB")
	w, err := planWorkers(opts, []methods.ModuleJob{big, big, big}, need*2) // room for one at a time (3/4 of 2x)
	require.NoError(t, err)
	assert.Equal(t, 1, w)
	linear := Options{Workers: 7, Combine: methods.Combine{CombinationType: "linear"}}
	require.NoError(t, linear.Validate())
	w, err = planWorkers(linear, []methods.ModuleJob{big}, 1<<40)
	require.NoError(t, err)
	assert.Equal(t, 7, w)
}

func TestDifferentBaseModelsWarn(t *testing.T) {
	root := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	mods := map[string]testutil.Module{"m.q": {A: testutil.RandTensor(rng, 4, 6), B: testutil.RandTensor(rng, 5, 4)}}
	dirs := []string{
		testutil.WriteAdapter(t, filepath.Join(root, "a"), map[string]any{"base_model_name_or_path": "meta/llama-3-8b"}, mods),
		testutil.WriteAdapter(t, filepath.Join(root, "b"), map[string]any{"base_model_name_or_path": "meta/llama-3-8b"}, mods),
		testutil.WriteAdapter(t, filepath.Join(root, "c"), map[string]any{"base_model_name_or_path": "mistral/7b"}, mods),
		testutil.WriteAdapter(t, filepath.Join(root, "d"), map[string]any{}, mods), // names none: not compared
	}
	res, err := Merge(context.Background(), Options{Adapters: dirs, Weights: adapter.ScalarWeights(1, 1, 1, 1), OutputDir: filepath.Join(root, "out"), Combine: methods.Combine{CombinationType: "cat"}}, nil)
	require.NoError(t, err)
	require.Len(t, res.Warnings, 1, res.Warnings)
	assert.Contains(t, res.Warnings[0], "different base models (meta/llama-3-8b and mistral/7b")
	assert.Contains(t, res.Warnings[0], dirs[2])
	res, err = Merge(context.Background(), Options{Adapters: dirs[:2], Weights: adapter.ScalarWeights(1, 1), OutputDir: filepath.Join(root, "same"), Combine: methods.Combine{CombinationType: "cat"}}, nil)
	require.NoError(t, err)
	assert.Empty(t, res.Warnings)
}

// End to end: a della merge of adapter directories gives the same bytes on one core and on all (its numbers are
// methods' TestDellaRowOnAdapterDirectories).
func TestMergeDellaEndToEnd(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	dir := t.TempDir()
	out, in, r := 24, 20, 4
	var dirs []string
	for i := range 3 {
		mods := map[string]testutil.Module{
			"m.layers.0.q": {A: testutil.RandTensor(rng, r, in), B: testutil.RandTensor(rng, out, r)},
			"m.layers.0.v": {A: testutil.RandTensor(rng, r, in), B: testutil.RandTensor(rng, out, r)},
		}
		dirs = append(dirs, testutil.WriteAdapter(t, filepath.Join(dir, "a"+string(rune('0'+i))), nil, mods))
	}
	density, seed, svdRank := 0.5, uint64(7), linalg.RankSpec{Fixed: 20}
	weights := []float64{1, 0.5, -0.3}
	run := func(name string, workers int) *adapter.Adapter {
		opts := Options{Adapters: dirs, Weights: adapter.ScalarWeights(weights...), Combine: methods.Combine{CombinationType: "della",
			Density: &density, Seed: &seed, SVDRank: &svdRank}, OutputDir: filepath.Join(dir, name), Workers: workers}
		_, err := Merge(context.Background(), opts, nil)
		require.NoError(t, err)
		a, err := adapter.Load(filepath.Join(dir, name))
		require.NoError(t, err)
		t.Cleanup(func() { _ = a.Close() })
		return a
	}
	run("one", 1)
	run("all", 0)
	b1, err := os.ReadFile(filepath.Join(dir, "one", adapter.WeightsFile))
	require.NoError(t, err)
	b2, err := os.ReadFile(filepath.Join(dir, "all", adapter.WeightsFile))
	require.NoError(t, err)
	require.Equal(t, b1, b2)
}
