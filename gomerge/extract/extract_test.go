package extract

import (
	"context"
	"encoding/json"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"testing"

	stlib "github.com/nlpodyssey/safetensors"
	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/safetensors"
)

// writeModel writes a model folder (config.json, model.safetensors) of
// float32 tensors.
func writeModel(t *testing.T, dir string, tensors map[string]*testutil.Tensor) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	cfg := `{"model_type": "llama", "architectures": ["LlamaForCausalLM"]}`
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o644))
	raw := map[string]safetensors.RawTensor{}
	for name, x := range tensors {
		raw[name] = safetensors.RawTensor{DType: safetensors.F32, Shape: x.Shape, Data: safetensors.Encode(safetensors.F32, x.Data)}
	}
	require.NoError(t, testutil.WriteSafetensors(filepath.Join(dir, "model.safetensors"), raw, map[string]string{"format": "pt"}))
	return dir
}

// lowRankChange returns a rank-r m x n matrix with singular values
// scale * decay^i.
func lowRankChange(rng *rand.Rand, m, n, r int, scale, decay float64) []float64 {
	u, v := testutil.Orthonormal(rng, m, r), testutil.Orthonormal(rng, n, r)
	d := make([]float64, m*n)
	for c := 0; c < r; c++ {
		s := scale * math.Pow(decay, float64(c))
		for i := 0; i < m; i++ {
			for j := 0; j < n; j++ {
				d[i*n+j] += u[i*r+c] * s * v[j*r+c]
			}
		}
	}
	return d
}

// extractPair is a base and a fine-tune: three linear modules changed by
// low-rank updates plus noise, one linear module unchanged, a changed
// norm, an unchanged embedding.
type extractPair struct {
	base, ft string
	dW       map[string][]float64 // the changes, as float32 made them
	shapes   map[string][2]int
}

func makeExtractPair(t *testing.T, noise float64) extractPair {
	rng := rand.New(rand.NewPCG(7, 8))
	dir := t.TempDir()
	shapes := map[string][2]int{
		"model.layers.0.self_attn.q_proj": {128, 96},
		"model.layers.0.mlp.down_proj":    {96, 160},
		"model.layers.1.self_attn.v_proj": {32, 96},
		"model.layers.1.self_attn.o_proj": {96, 96},
	}
	base, ft := map[string]*testutil.Tensor{}, map[string]*testutil.Tensor{}
	p := extractPair{dW: map[string][]float64{}, shapes: shapes}
	for name, s := range shapes {
		b := testutil.RandTensor(rng, s[0], s[1])
		f := &testutil.Tensor{Shape: b.Shape, Data: append([]float32(nil), b.Data...)}
		if name != "model.layers.1.self_attn.o_proj" {
			d := lowRankChange(rng, s[0], s[1], 6, 1, 0.6)
			for i := range d {
				f.Data[i] += float32(d[i] + noise*rng.NormFloat64())
			}
			dw := make([]float64, len(d))
			for i := range dw {
				dw[i] = float64(f.Data[i] - b.Data[i])
			}
			p.dW[name] = dw
		}
		base[name+".weight"], ft[name+".weight"] = b, f
	}
	norm := &testutil.Tensor{Shape: []int{96}, Data: make([]float32, 96)}
	for i := range norm.Data {
		norm.Data[i] = 1
	}
	base["model.norm.weight"] = norm
	ft["model.norm.weight"] = &testutil.Tensor{Shape: []int{96}, Data: append([]float32(nil), norm.Data...)}
	ft["model.norm.weight"].Data[3] = 1.5
	emb := testutil.RandTensor(rng, 50, 96)
	base["model.embed_tokens.weight"], ft["model.embed_tokens.weight"] = emb, emb
	p.base, p.ft = writeModel(t, filepath.Join(dir, "base"), base), writeModel(t, filepath.Join(dir, "ft"), ft)
	return p
}

// optimalError is the relative Frobenius error of the best rank-k
// approximation of d, from a full SVD.
func optimalError(d []float64, m, n, k int) float64 {
	var svd mat.SVD
	if !svd.Factorize(mat.NewDense(m, n, append([]float64(nil), d...)), mat.SVDNone) {
		panic("svd")
	}
	total, rest := 0.0, 0.0
	for i, s := range svd.Values(nil) {
		total += s * s
		if i >= k {
			rest += s * s
		}
	}
	return math.Sqrt(rest / total)
}

// readFactors reads a module's A and B from an extracted adapter.
func readFactors(t *testing.T, dir, module string) (a, b []float32, r int) {
	t.Helper()
	f, err := safetensors.Open(filepath.Join(dir, adapter.WeightsFile))
	require.NoError(t, err)
	defer f.Close()
	aName, bName := adapter.ModuleKeys(module, adapter.KindLinear)
	a, err = f.ReadFloat32(aName)
	require.NoError(t, err)
	b, err = f.ReadFloat32(bName)
	require.NoError(t, err)
	return a, b, f.Entries[aName].Shape[0]
}

func TestExtract(t *testing.T) {
	tests := []struct {
		name      string
		noise     float64
		rank      linalg.RankSpec
		maxRank   int
		wantRanks map[string]int // nil: every module at rank.Fixed
		maxRatio  float64        // error / optimal error, at most
		exact     bool           // the change is exactly low rank: error ~ 0
	}{
		{name: "exact low rank", rank: linalg.RankSpec{Fixed: 6}, exact: true},
		{name: "low rank plus noise, rank 4", noise: 1e-3, rank: linalg.RankSpec{Fixed: 4}, maxRatio: 1.01},
		{name: "low rank plus noise, rank 8", noise: 1e-3, rank: linalg.RankSpec{Fixed: 8}, maxRatio: 1.01},
		{name: "rank above a short side", noise: 1e-3, rank: linalg.RankSpec{Fixed: 40}, maxRatio: 1.01,
			wantRanks: map[string]int{"model.layers.0.self_attn.q_proj": 40, "model.layers.0.mlp.down_proj": 40, "model.layers.1.self_attn.v_proj": 32}},
		{name: "energy rule", rank: linalg.RankSpec{Energy: 0.99}, maxRatio: 1.01},
		{name: "energy rule capped", rank: linalg.RankSpec{Energy: 0.99}, maxRank: 2, maxRatio: 1.01,
			wantRanks: map[string]int{"model.layers.0.self_attn.q_proj": 2, "model.layers.0.mlp.down_proj": 2, "model.layers.1.self_attn.v_proj": 2}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := makeExtractPair(t, tc.noise)
			out := filepath.Join(t.TempDir(), "adapter")
			opts := Options{Base: p.base, Finetuned: p.ft, OutputDir: out, Rank: &tc.rank}
			if tc.maxRank > 0 {
				opts.MaxRank = &tc.maxRank
			}
			res, err := Extract(context.Background(), opts, nil)
			require.NoError(t, err)
			assert.Equal(t, 3, res.Modules)
			assert.Equal(t, []string{"model.layers.1.self_attn.o_proj"}, res.Unchanged)
			require.Len(t, res.Warnings, 1)
			assert.Contains(t, res.Warnings[0], "model.norm")
			for module, dw := range p.dW {
				s := p.shapes[module]
				a, b, r := readFactors(t, out, module)
				assert.Equal(t, res.ModuleRanks[module], r)
				if tc.wantRanks != nil {
					assert.Equal(t, tc.wantRanks[module], r, module)
				} else if tc.rank.Fixed > 0 {
					assert.Equal(t, tc.rank.Fixed, r, module)
				}
				ba := testutil.Product(a, b, s[0], r, s[1])
				errSq, total := 0.0, 0.0
				for i := range dw {
					errSq += (dw[i] - ba[i]) * (dw[i] - ba[i])
					total += dw[i] * dw[i]
				}
				got := math.Sqrt(errSq / total)
				assert.InDelta(t, got, res.ModuleErrors[module], 1e-4+1e-3*got, "%s: reported error", module)
				if tc.exact {
					assert.Less(t, got, 1e-5, module)
					continue
				}
				opt := optimalError(dw, s[0], s[1], r)
				if tc.rank.Energy > 0 && tc.maxRank == 0 {
					// the smallest rank that keeps the energy: the optimal rank-(r-1) error is above 1 - energy
					assert.LessOrEqual(t, opt*opt, 1-tc.rank.Energy+1e-9, module)
					assert.Greater(t, math.Pow(optimalError(dw, s[0], s[1], r-1), 2), 1-tc.rank.Energy, module)
				}
				t.Logf("%s: rank %d, error %.6g, optimal %.6g", module, r, got, opt)
				assert.LessOrEqual(t, got, tc.maxRatio*opt+1e-7, module)
			}
			var cfg map[string]any
			data, err := os.ReadFile(filepath.Join(out, adapter.ConfigFile))
			require.NoError(t, err)
			require.NoError(t, json.Unmarshal(data, &cfg))
			assert.Equal(t, float64(res.Rank), cfg["r"])
			assert.Equal(t, cfg["r"], cfg["lora_alpha"])
			assert.Equal(t, "CAUSAL_LM", cfg["task_type"])
			assert.ElementsMatch(t, []any{"model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.v_proj"}, cfg["target_modules"])
			assert.Equal(t, cfg["rank_pattern"], cfg["alpha_pattern"])
			for module, r := range res.ModuleRanks {
				rp := cfg["rank_pattern"].(map[string]any)
				if r != res.Rank {
					assert.Equal(t, float64(r), rp[regexp.QuoteMeta(module)], module)
				}
			}
			card, err := os.ReadFile(filepath.Join(out, "README.md"))
			require.NoError(t, err)
			assert.Contains(t, string(card), "model.layers.1.self_attn.o_proj")
			assert.Contains(t, string(card), "| `model.layers.0.self_attn.q_proj` |")
		})
	}
}

func TestExtractModulesToSave(t *testing.T) {
	tests := []struct {
		name     string
		opts     func(*Options)
		wantSave []string
		warnings int
	}{
		{name: "changed modules", opts: func(o *Options) { o.SaveChanged = true }, wantSave: []string{"model.norm"}},
		{name: "named by last part", opts: func(o *Options) { o.SaveModules = []string{"norm"} }, wantSave: []string{"model.norm"}},
		{name: "named, unchanged", opts: func(o *Options) { o.SaveModules = []string{"embed_tokens"} },
			wantSave: []string{"model.embed_tokens"}, warnings: 1},
		{name: "a linear module named", opts: func(o *Options) { o.SaveModules = []string{"model.layers.0.self_attn.q_proj"} },
			wantSave: []string{"model.layers.0.self_attn.q_proj"}, warnings: 1},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			p := makeExtractPair(t, 0)
			out := filepath.Join(t.TempDir(), "adapter")
			opts := Options{Base: p.base, Finetuned: p.ft, OutputDir: out, Rank: &linalg.RankSpec{Fixed: 6}}
			tc.opts(&opts)
			res, err := Extract(context.Background(), opts, nil)
			require.NoError(t, err)
			assert.Equal(t, tc.wantSave, res.ModulesToSave)
			assert.Len(t, res.Warnings, tc.warnings)
			f, err := safetensors.Open(filepath.Join(out, adapter.WeightsFile))
			require.NoError(t, err)
			defer f.Close()
			for _, m := range tc.wantSave {
				got, err := f.ReadFloat32(adapter.KeyPrefix + m + ".weight")
				require.NoError(t, err)
				src, err := safetensors.Open(filepath.Join(p.ft, "model.safetensors"))
				require.NoError(t, err)
				want, err := src.ReadFloat32(m + ".weight")
				src.Close()
				require.NoError(t, err)
				assert.Equal(t, want, got, m)
			}
			var cfg map[string]any
			data, _ := os.ReadFile(filepath.Join(out, adapter.ConfigFile))
			require.NoError(t, json.Unmarshal(data, &cfg))
			want := make([]any, len(tc.wantSave))
			for i, s := range tc.wantSave {
				want[i] = s
			}
			assert.Equal(t, want, cfg["modules_to_save"])
		})
	}
}

func TestExtractIsDeterministic(t *testing.T) {
	p := makeExtractPair(t, 1e-3)
	var files [][]byte
	for _, workers := range []int{1, 2, 1} {
		out := filepath.Join(t.TempDir(), "adapter")
		seed := uint64(5)
		_, err := Extract(context.Background(), Options{Base: p.base, Finetuned: p.ft, OutputDir: out,
			Rank: &linalg.RankSpec{Fixed: 4}, Workers: workers, Seed: &seed}, nil)
		require.NoError(t, err)
		b, err := os.ReadFile(filepath.Join(out, adapter.WeightsFile))
		require.NoError(t, err)
		files = append(files, b)
	}
	assert.Equal(t, files[0], files[1], "1 and 2 workers")
	assert.Equal(t, files[0], files[2], "two runs")
}

func TestExtractErrors(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	w := testutil.RandTensor(rng, 8, 6)
	w2 := testutil.RandTensor(rng, 8, 6)
	tests := []struct {
		name string
		base map[string]*testutil.Tensor
		ft   map[string]*testutil.Tensor
		opts func(*Options)
		kind errs.ErrKind
		msg  string
	}{
		{name: "shapes disagree", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": testutil.RandTensor(rng, 6, 8)},
			kind: errs.KindValue, msg: "tensor l.q_proj.weight has shape [8, 6] in the base model"},
		{name: "missing in the fine-tune", base: map[string]*testutil.Tensor{"l.q_proj.weight": w, "l.k_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			kind: errs.KindValue, msg: "tensor l.k_proj.weight is in the base model"},
		{name: "missing in the base", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2, "l.k_proj.weight": w},
			kind: errs.KindValue, msg: "tensor l.k_proj.weight is in the fine-tuned model"},
		{name: "nothing changed", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w},
			kind: errs.KindValue, msg: "no linear module"},
		{name: "rank 0", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			opts: func(o *Options) { o.Rank = &linalg.RankSpec{} }, kind: errs.KindValue, msg: "rank: 0"},
		{name: "no rank", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			opts: func(o *Options) { o.Rank = nil }, kind: errs.KindValue, msg: "give a rank"},
		{name: "save module that does not exist", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			opts: func(o *Options) { o.SaveModules = []string{"lm_head"} }, kind: errs.KindValue, msg: `"lm_head" names no module`},
		{name: "output is an input", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			opts: func(o *Options) { o.OutputDir = o.Base }, kind: errs.KindValue, msg: "is also an input"},
		{name: "output exists", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			opts: func(o *Options) { require.NoError(t, os.MkdirAll(o.OutputDir, 0o755)) }, kind: errs.KindFileExists, msg: "already exists"},
		{name: "missing folder", base: map[string]*testutil.Tensor{"l.q_proj.weight": w}, ft: map[string]*testutil.Tensor{"l.q_proj.weight": w2},
			opts: func(o *Options) { o.Finetuned += "-missing" }, kind: errs.KindFileNotFound, msg: "does not exist"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			opts := Options{Base: writeModel(t, filepath.Join(dir, "base"), tc.base), Finetuned: writeModel(t, filepath.Join(dir, "ft"), tc.ft),
				OutputDir: filepath.Join(dir, "out"), Rank: &linalg.RankSpec{Fixed: 2}}
			if tc.opts != nil {
				tc.opts(&opts)
			}
			before, _ := os.ReadDir(dir)
			_, err := Extract(context.Background(), opts, nil)
			require.Error(t, err)
			assert.Equal(t, tc.kind, errs.KindOf(err))
			assert.Contains(t, err.Error(), tc.msg)
			after, _ := os.ReadDir(dir)
			assert.Equal(t, len(before), len(after), "nothing is written")
		})
	}
}

// A non-float tensor is refused, naming the tensor and the file.
func TestExtractRefusesIntegerTensors(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(3, 4))
	w := testutil.RandTensor(rng, 8, 6)
	base := writeModel(t, filepath.Join(dir, "base"), map[string]*testutil.Tensor{"l.q_proj.weight": w})
	ft := writeModel(t, filepath.Join(dir, "ft"), map[string]*testutil.Tensor{})
	v, err := stlib.NewTensorView(stlib.I64, []uint64{8, 6}, make([]byte, 8*6*8))
	require.NoError(t, err)
	f, err := os.Create(filepath.Join(ft, "model.safetensors"))
	require.NoError(t, err)
	require.NoError(t, stlib.SerializeToWriter(map[string]stlib.TensorView{"l.q_proj.weight": v}, nil, f))
	require.NoError(t, f.Close())
	_, err = Extract(context.Background(), Options{Base: base, Finetuned: ft, OutputDir: filepath.Join(dir, "out"), Rank: &linalg.RankSpec{Fixed: 2}}, nil)
	require.Error(t, err)
	assert.Equal(t, errs.KindValue, errs.KindOf(err))
	assert.Contains(t, err.Error(), "tensor l.q_proj.weight in "+filepath.Join(ft, "model.safetensors")+" has dtype I64")
	assert.NoDirExists(t, filepath.Join(dir, "out"))
}

// factorizeDense on a matrix large enough for the sketch (a slowly decaying
// spectrum and noise, as a fine-tune's dW): the error of a fixed rank and of
// the energy rule (whose sketch grows past its first size for 0.9) is within
// 1% of the optimal one, at the optimal energy rank.
func TestFactorizeDenseSketched(t *testing.T) {
	const m, n = 700, 600
	rng := rand.New(rand.NewPCG(9, 9))
	low := lowRankChange(rng, m, n, 200, 1, 1)
	u, v := testutil.Orthonormal(rng, m, 200), testutil.Orthonormal(rng, n, 200)
	d := make([]float32, m*n)
	dd := make([]float64, m*n)
	for i := range low {
		low[i] = 0
	}
	for c := 0; c < 200; c++ {
		s := 1 / (1 + float64(c)/8)
		for i := 0; i < m; i++ {
			for j := 0; j < n; j++ {
				low[i*n+j] += u[i*200+c] * s * v[j*200+c]
			}
		}
	}
	total := 0.0
	for i := range d {
		d[i] = float32(low[i] + 0.002*rng.NormFloat64())
		dd[i] = float64(d[i])
		total += dd[i] * dd[i]
	}
	var svd mat.SVD
	require.True(t, svd.Factorize(mat.NewDense(m, n, append([]float64(nil), dd...)), mat.SVDNone))
	sv := svd.Values(nil)
	optimal := func(k int) float64 {
		rest := 0.0
		for _, s := range sv[k:] {
			rest += s * s
		}
		return math.Sqrt(rest / total)
	}
	energyRank := func(e float64) int {
		kept := 0.0
		for i, s := range sv {
			if kept += s * s; kept >= e*total {
				return i + 1
			}
		}
		return len(sv)
	}
	tests := []struct {
		name     string
		rule     linalg.RankRule
		wantRank int
		sketched bool
	}{
		{name: "rank 16", rule: linalg.RankRule{Fixed: 16}, wantRank: 16, sketched: true},
		{name: "energy 0.5", rule: linalg.RankRule{Energy: 0.5}, wantRank: energyRank(0.5), sketched: true},
		{name: "energy 0.9, past the first sketch", rule: linalg.RankRule{Energy: 0.9}, wantRank: energyRank(0.9)},
		{name: "energy 0.9 capped", rule: linalg.RankRule{Energy: 0.9, Max: 40}, wantRank: 40, sketched: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			bk, ak, r, relErr := factorizeDense(d, m, n, total, tc.rule, func() *rand.Rand { return rand.New(rand.NewPCG(1, 2)) })
			k := r // the last sketch's size: the rank, or for the energy rule the first size doubled past it
			if tc.rule.Fixed == 0 {
				for k = extractSketch; k < r; k *= 2 {
				}
				if tc.rule.Max > 0 {
					k = min(k, tc.rule.Max)
				}
			}
			l := k + linalg.RSVDOversample
			assert.Equal(t, tc.sketched, min(m, n) > (2*PowerIters+2)*l, "the case takes the path it is named for")
			assert.Equal(t, tc.wantRank, r)
			ba := testutil.Product(methods.ToFloat32(ak), methods.ToFloat32(bk), m, r, n)
			errSq := 0.0
			for i := range dd {
				errSq += (dd[i] - ba[i]) * (dd[i] - ba[i])
			}
			got := math.Sqrt(errSq / total)
			t.Logf("rank %d: error %.6f, optimal %.6f, ratio %.5f", r, got, optimal(r), got/optimal(r))
			assert.InDelta(t, got, relErr, 1e-4)
			assert.LessOrEqual(t, got, 1.01*optimal(r))
		})
	}
}

// A changed bias of a factorised linear module is not carried (LoRA holds no
// bias): it is named in the warnings, never saved into modules_to_save
// beside the module's LoRA factors.
func TestExtractChangedBiasOfALinearModule(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	dir := t.TempDir()
	w, b := testutil.RandTensor(rng, 8, 6), testutil.RandTensor(rng, 8)
	w2, b2 := testutil.RandTensor(rng, 8, 6), testutil.RandTensor(rng, 8)
	base := writeModel(t, filepath.Join(dir, "base"), map[string]*testutil.Tensor{"l.q_proj.weight": w, "l.q_proj.bias": b})
	ft := writeModel(t, filepath.Join(dir, "ft"), map[string]*testutil.Tensor{"l.q_proj.weight": w2, "l.q_proj.bias": b2})
	res, err := Extract(context.Background(), Options{Base: base, Finetuned: ft, OutputDir: filepath.Join(dir, "out"),
		Rank: &linalg.RankSpec{Fixed: 2}, SaveChanged: true}, nil)
	require.NoError(t, err)
	assert.Empty(t, res.ModulesToSave)
	require.Len(t, res.Warnings, 1)
	assert.Contains(t, res.Warnings[0], "l.q_proj")
	assert.Equal(t, map[string]int{"l.q_proj": 2}, res.ModuleRanks)
}

// A cancelled extraction returns ErrCancelled and writes nothing.
func TestExtractCancelled(t *testing.T) {
	p := makeExtractPair(t, 1e-3)
	out := filepath.Join(t.TempDir(), "adapter")
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	_, err := Extract(ctx, Options{Base: p.base, Finetuned: p.ft, OutputDir: out, Rank: &linalg.RankSpec{Fixed: 4}}, nil)
	assert.Equal(t, errs.KindCancelled, errs.KindOf(err))
	entries, _ := os.ReadDir(filepath.Dir(out))
	assert.Empty(t, entries)
}
