package serve

import (
	"context"
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/testutil"
)

func TestRankSets(t *testing.T) {
	for _, tc := range []struct {
		target   string
		r        int
		up, down int
		upOK     bool
	}{
		{"vllm", 1, 1, 1, true},
		{"vllm", 2, 8, 1, true},
		{"vllm", 300, 320, 256, true},
		{"vllm", 513, 0, 512, false},
		{"lorax", 1, 8, 0, true},
		{"lorax", 9, 16, 8, true},
		{"lorax", 33, 48, 32, true},
		{"sglang", 13, 13, 13, true},
		{"portable", 1, 8, 0, true},
		{"portable", 257, 320, 256, true},
	} {
		tg, err := Lookup(tc.target)
		require.NoError(t, err)
		up, ok := tg.Ranks.Up(tc.r)
		assert.Equal(t, tc.upOK, ok, "%s up %d", tc.target, tc.r)
		assert.Equal(t, tc.up, up, "%s up %d", tc.target, tc.r)
		down, _ := tg.Ranks.Down(tc.r)
		assert.Equal(t, tc.down, down, "%s down %d", tc.target, tc.r)
	}
	_, err := Lookup("tgi")
	assert.ErrorContains(t, err, "vllm, sglang, lorax, portable")
}

// mixedAdapter writes an adapter with modules of ranks 3 and 5, alpha_pattern and rsLoRA.
func mixedAdapter(t *testing.T, dir string, extra map[string]any) (string, map[string]testutil.Module) {
	rng := rand.New(rand.NewPCG(1, 2))
	mods := map[string]testutil.Module{
		"layers.0.q": {A: testutil.RandTensor(rng, 3, 6), B: testutil.RandTensor(rng, 7, 3)},
		"layers.0.v": {A: testutil.RandTensor(rng, 5, 6), B: testutil.RandTensor(rng, 4, 5)},
	}
	cfg := map[string]any{"r": 3, "lora_alpha": 6, "use_rslora": true, "target_modules": []string{"q", "v"},
		"rank_pattern": map[string]any{"v": 5}, "alpha_pattern": map[string]any{"v": 2}}
	for k, v := range extra {
		cfg[k] = v
	}
	return testutil.WriteAdapter(t, dir, cfg, mods), mods
}

func TestCheckNamesEachProblem(t *testing.T) {
	dir, _ := mixedAdapter(t, t.TempDir(), nil)
	v, err := CheckDir(dir)
	require.NoError(t, err)
	require.Len(t, v, len(Targets))
	byName := map[string]Verdict{}
	for _, x := range v {
		byName[x.Target] = x
	}
	assert.False(t, byName["vllm"].Loads)
	assert.Contains(t, byName["vllm"].Reasons[0], "rank_pattern / alpha_pattern: vLLM ignores them")
	assert.Contains(t, byName["lorax"].Reasons[len(byName["lorax"].Reasons)-1], "rank 3 (1 modules): LoRAX needs 8")
	// SGLang keeps the patterns; rsLoRA is the only reason
	require.Len(t, byName["sglang"].Reasons, 1)
	assert.Contains(t, byName["sglang"].Reasons[0], "use_rslora")
	for _, x := range v {
		assert.True(t, x.Fixable)
	}
}

func TestCheckPlainAdapterLoads(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	dir := testutil.WriteAdapter(t, t.TempDir(), map[string]any{"r": 16, "lora_alpha": 16}, map[string]testutil.Module{
		"q": {A: testutil.RandTensor(rng, 16, 4), B: testutil.RandTensor(rng, 4, 16)},
	})
	v, err := CheckDir(dir)
	require.NoError(t, err)
	for _, x := range v {
		assert.True(t, x.Loads, "%s: %v", x.Target, x.Reasons)
	}
}

// update is s B A of a module in float64.
func update(m testutil.Module, s float64) *mat.Dense {
	out, r, in := m.B.Shape[0], m.A.Shape[0], m.A.Shape[1]
	p := testutil.Product(m.A.Data, m.B.Data, out, r, in)
	for i := range p {
		p[i] *= s
	}
	return mat.NewDense(out, in, p)
}

func readOut(t *testing.T, dir string) (*adapter.Adapter, map[string]any) {
	a, err := adapter.Load(dir)
	require.NoError(t, err)
	t.Cleanup(func() { a.Close() })
	raw, err := os.ReadFile(filepath.Join(dir, adapter.ConfigFile))
	require.NoError(t, err)
	var cfg map[string]any
	require.NoError(t, json.Unmarshal(raw, &cfg))
	return a, cfg
}

func TestExportPadsExactly(t *testing.T) {
	src, mods := mixedAdapter(t, t.TempDir(), nil)
	scales := map[string]float64{"layers.0.q": 6 / math.Sqrt(3), "layers.0.v": 2 / math.Sqrt(5)}
	for _, target := range Names() {
		out := filepath.Join(t.TempDir(), "out")
		res, err := Export(context.Background(), Options{Adapter: src, Target: target, OutputDir: out}, nil)
		require.NoError(t, err, target)
		want := map[string]int{"vllm": 8, "sglang": 5, "lorax": 8, "portable": 8}[target]
		assert.Equal(t, want, res.Rank, target)
		assert.Equal(t, map[string]int{"sglang": 1}[target]+2*btoi(target != "sglang"), res.Padded, target)
		assert.ElementsMatch(t, []string{"rank_pattern", "alpha_pattern", "use_rslora"}, res.Removed)
		a, cfg := readOut(t, out)
		assert.EqualValues(t, want, cfg["r"])
		assert.EqualValues(t, want, cfg["lora_alpha"])
		assert.Equal(t, map[string]any{}, cfg["rank_pattern"])
		assert.Equal(t, false, cfg["use_rslora"])
		for name, m := range mods {
			om := a.Modules[name]
			require.Equal(t, want, om.Rank)
			assert.Equal(t, 1.0, om.Scaling)
			fa, fb, err := om.Factors()
			require.NoError(t, err)
			got := mat.NewDense(om.Out(), om.In(), testutil.Product(fa, fb, om.Out(), want, om.In()))
			ref := update(m, scales[name])
			// one float32 rounding of s*B per element, then an exact product: |dW| <= u |s||B||A|
			assert.True(t, mat.EqualApprox(got, ref, 1e-5*mat.Norm(ref, math.Inf(1))), "%s %s", target, name)
		}
		v, err := CheckDir(out)
		require.NoError(t, err)
		for _, x := range v {
			if x.Target == target || target == "portable" {
				assert.True(t, x.Loads, "%s output on %s: %v", target, x.Target, x.Reasons)
			}
		}
	}
}

func TestExportTruncatesWithExactTail(t *testing.T) {
	src, mods := mixedAdapter(t, t.TempDir(), map[string]any{"use_rslora": false})
	out := filepath.Join(t.TempDir(), "out")
	res, err := Export(context.Background(), Options{Adapter: src, Target: "sglang", OutputDir: out, MaxRank: ptr(4)}, nil)
	require.NoError(t, err)
	assert.Equal(t, 4, res.Rank)
	require.Len(t, res.Truncated, 1)
	tr := res.Truncated["layers.0.v"]
	ref := update(mods["layers.0.v"], 2.0/5)
	var svd mat.SVD
	require.True(t, svd.Factorize(ref, mat.SVDNone))
	sv := svd.Values(nil)
	require.Len(t, tr.Tail, 0) // the update is 4 x 6: rank 4 at most, nothing is lost
	assert.InDelta(t, 0, tr.Error, 1e-6*sv[0])

	res, err = Export(context.Background(), Options{Adapter: src, Target: "sglang", OutputDir: out, MaxRank: ptr(2), Overwrite: true}, nil)
	require.NoError(t, err)
	require.Len(t, res.Truncated, 2)
	for name, m := range mods {
		s := map[string]float64{"layers.0.q": 2, "layers.0.v": 0.4}[name]
		ref := update(m, s)
		require.True(t, svd.Factorize(ref, mat.SVDNone))
		sv := svd.Values(nil)
		tr := res.Truncated[name]
		// the update has rank min(r, out, in) at most: the tail lists those singular values, the rest are zero
		r := min(m.A.Shape[0], m.A.Shape[1], m.B.Shape[0])
		require.Len(t, tr.Tail, r-2, name)
		rest := 0.0
		for i, v := range sv[2:] {
			if i < len(tr.Tail) {
				assert.InDelta(t, v, tr.Tail[i], 1e-10*sv[0], name)
				rest += tr.Tail[i] * tr.Tail[i]
			} else {
				assert.InDelta(t, 0, v, 1e-10*sv[0], name)
			}
		}
		assert.InDelta(t, math.Sqrt(rest), tr.Error, 1e-12*sv[0])
	}
}

func TestExportRefusals(t *testing.T) {
	src, _ := mixedAdapter(t, t.TempDir(), nil)
	for _, tc := range []struct {
		name string
		opts Options
		want string
	}{
		{"unknown target", Options{Target: "tgi"}, "unknown serving target \"tgi\""},
		{"max rank below the set", Options{Target: "lorax", MaxRank: ptr(4)}, "max_rank: 4 is below every rank LoRAX loads"},
		{"max rank not positive", Options{Target: "vllm", MaxRank: ptr(0)}, "max_rank: must be a positive integer, got 0"},
		{"bad dtype", Options{Target: "vllm", DType: "int8"}, "dtype:"},
	} {
		tc.opts.Adapter, tc.opts.OutputDir = src, filepath.Join(t.TempDir(), "out")
		_, err := Export(context.Background(), tc.opts, nil)
		assert.ErrorContains(t, err, tc.want, tc.name)
		assert.NoDirExists(t, tc.opts.OutputDir)
	}
	// DoRA and modules_to_save
	rng := rand.New(rand.NewPCG(5, 6))
	dora := testutil.WriteAdapter(t, t.TempDir(), map[string]any{"use_dora": true}, map[string]testutil.Module{
		"q": {A: testutil.RandTensor(rng, 4, 3), B: testutil.RandTensor(rng, 2, 4)},
	})
	_, err := Export(context.Background(), Options{Adapter: dora, Target: "vllm", OutputDir: filepath.Join(t.TempDir(), "o")}, nil)
	assert.ErrorContains(t, err, "vLLM does not load DoRA adapters")
	saved := testutil.WriteAdapter(t, t.TempDir(), map[string]any{"modules_to_save": []string{"lm_head"}}, map[string]testutil.Module{
		"q": {A: testutil.RandTensor(rng, 4, 3), B: testutil.RandTensor(rng, 2, 4)},
	})
	out := filepath.Join(t.TempDir(), "o")
	_, err = Export(context.Background(), Options{Adapter: saved, Target: "portable", OutputDir: out}, nil)
	assert.ErrorContains(t, err, "modules_to_save (modules_to_save [\"lm_head\"]): the portable form does not load them")
	res, err := Export(context.Background(), Options{Adapter: saved, Target: "portable", OutputDir: out, DropModulesToSave: true}, nil)
	require.NoError(t, err)
	assert.Contains(t, res.Removed, "modules_to_save")
	_, cfg := readOut(t, out)
	assert.Nil(t, cfg["modules_to_save"])
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func ptr(v int) *int { return &v }

// Embeddings (lora_embedding_A / _B) and 1x1-B convolutions keep their
// kinds and trailing dimensions; the padded update equals s B A.
func TestExportEmbeddingAndConv(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	mods := map[string]testutil.Module{
		"embed_tokens": {A: testutil.RandTensor(rng, 3, 10), B: testutil.RandTensor(rng, 5, 3), Embed: true},
		"conv":         {A: testutil.RandTensor(rng, 3, 2, 3, 3), B: testutil.RandTensor(rng, 4, 3, 1, 1)},
	}
	src := testutil.WriteAdapter(t, t.TempDir(), map[string]any{"r": 3, "lora_alpha": 5, "target_modules": []string{"embed_tokens", "conv"}}, mods)
	out := filepath.Join(t.TempDir(), "out")
	res, err := Export(context.Background(), Options{Adapter: src, Target: "lorax", OutputDir: out}, nil)
	require.NoError(t, err)
	assert.Equal(t, 8, res.Rank)
	a, _ := readOut(t, out)
	assert.Equal(t, adapter.KindEmbedding, a.Modules["embed_tokens"].Kind)
	assert.Equal(t, []int{8, 2, 3, 3}, a.Modules["conv"].RawA.Shape)
	assert.Equal(t, []int{4, 8, 1, 1}, a.Modules["conv"].RawB.Shape)
	for name, m := range mods {
		om := a.Modules[name]
		fa, fb, err := om.Factors()
		require.NoError(t, err)
		got := mat.NewDense(om.Out(), om.In(), testutil.Product(fa, fb, om.Out(), 8, om.In()))
		flat := testutil.Module{A: &testutil.Tensor{Shape: []int{3, om.In()}, Data: m.A.Data}, B: &testutil.Tensor{Shape: []int{om.Out(), 3}, Data: m.B.Data}}
		ref := update(flat, 5.0/3)
		// s B rounded once to float32 (relative u = 2^-24 per element), then an exact product
		assert.True(t, mat.EqualApprox(got, ref, 1e-6*mat.Norm(ref, math.Inf(1))), name)
	}
}
