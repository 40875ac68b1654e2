package fuse

import (
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/quant"
	"gomerge/gomerge/safetensors"
)

// writeFP8Base writes an FP8 blockwise base folder (blocks of 32, ragged at 40 x 70) with one adapted weight
// (model.q) and one untouched (model.k), and returns the dequantized weights.
func writeFP8Base(t *testing.T, dir string, cfg string, rng *rand.Rand) map[string][]float32 {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o644))
	f := quant.FP8Block{Rows: 40, Cols: 70, BlockRows: 32, BlockCols: 32}
	var outs []safetensors.OutTensor
	data := map[string][]byte{}
	deq := map[string][]float32{}
	for _, n := range []string{"model.q", "model.k"} {
		w := testutil.RandTensor(rng, 40, 70).Data
		q, inv := make([]byte, len(w)), make([]float32, 2*3)
		f.Quantize(q, inv, w)
		data[n+".weight"], data[n+".weight_scale_inv"] = q, safetensors.Float32AsBytes(inv)
		outs = append(outs, safetensors.OutTensor{Name: n + ".weight", RawDType: "F8_E4M3", Shape: []int{40, 70}},
			safetensors.OutTensor{Name: n + ".weight_scale_inv", DType: safetensors.F32, Shape: []int{2, 3}})
		d := make([]float32, len(w))
		f.Dequantize(d, q, inv)
		for i, v := range d {
			d[i] = safetensors.Round(safetensors.BF16, v) // the config's dtype
		}
		deq[n+".weight"] = d
	}
	w, err := safetensors.Create(filepath.Join(dir, "model.safetensors"), outs, map[string]string{"format": "pt"})
	require.NoError(t, err)
	for n, b := range data {
		require.NoError(t, w.WriteTensor(n, b))
	}
	require.NoError(t, w.Close())
	return deq
}

const fp8Config = `{"dtype": "bfloat16", "quantization_config": {"quant_method": "fp8", "weight_block_size": [32, 32]}}`

func TestFuseFP8BlockBothWays(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	root := t.TempDir()
	base := filepath.Join(root, "base")
	deq := writeFP8Base(t, base, fp8Config, rng)
	a, b := testutil.RandTensor(rng, 2, 70), testutil.RandTensor(rng, 40, 2)
	ad := testutil.WriteAdapter(t, filepath.Join(root, "a"), map[string]any{"r": 2, "lora_alpha": 4, "target_modules": []string{"q"}},
		map[string]testutil.Module{"model.q": {A: a, B: b}})
	ba := testutil.Product(a.Data, b.Data, 40, 2, 70)
	sum := make([]float32, len(ba)) // the float64 sum rounded once to float32: the quantizer's input
	for i, d := range ba {
		sum[i] = float32(float64(deq["model.q.weight"][i]) + 2*d)
	}
	raw := func(dir, name string) []byte {
		f, err := modelfolder.Open(dir)
		require.NoError(t, err)
		defer f.Close()
		x, err := f.ReadRaw(name, nil)
		require.NoError(t, err)
		return x
	}

	res, err := Fuse(context.Background(), Options{Base: base, Adapters: []string{ad}, OutputDir: filepath.Join(root, "keep"), KeepFormat: true}, nil)
	require.NoError(t, err)
	f := quant.FP8Block{Rows: 40, Cols: 70, BlockRows: 32, BlockCols: 32}
	q, inv := make([]byte, len(sum)), make([]float32, 6)
	f.Quantize(q, inv, sum)
	assert.Equal(t, q, raw(filepath.Join(root, "keep"), "model.q.weight"))
	assert.Equal(t, safetensors.Float32AsBytes(inv), raw(filepath.Join(root, "keep"), "model.q.weight_scale_inv"))
	for _, n := range []string{"model.k.weight", "model.k.weight_scale_inv"} {
		assert.Equal(t, raw(base, n), raw(filepath.Join(root, "keep"), n), n)
	}
	require.NotNil(t, res.Quantized)
	require.Len(t, res.Quantized.Tensors, 1)
	assert.InDelta(t, 1, res.Quantized.Tensors[0].Survival, 0.2)
	card, err := os.ReadFile(filepath.Join(root, "keep", "README.md"))
	require.NoError(t, err)
	assert.Contains(t, string(card), "Quantized base")

	_, err = Fuse(context.Background(), Options{Base: base, Adapters: []string{ad}, OutputDir: filepath.Join(root, "bf16"), DType: "bf16"}, nil)
	require.NoError(t, err)
	got := readFolder(t, filepath.Join(root, "bf16"))
	assert.Len(t, got, 2) // the scales are gone
	for i, d := range ba {
		want := safetensors.Round(safetensors.BF16, toFloat32For(float64(deq["model.q.weight"][i])+2*d, safetensors.BF16))
		require.Equal(t, want, got["model.q.weight"][i], "element %d", i)
	}
	assert.Equal(t, deq["model.k.weight"], got["model.k.weight"])
	cfg, err := os.ReadFile(filepath.Join(root, "bf16", "config.json"))
	require.NoError(t, err)
	assert.NotContains(t, string(cfg), "quantization_config")
}

func TestFuseQuantizedRefusals(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	root := t.TempDir()
	ad := testutil.WriteAdapter(t, filepath.Join(root, "a"), map[string]any{"r": 2, "lora_alpha": 4, "target_modules": []string{"q"}},
		map[string]testutil.Module{"model.q": {A: testutil.RandTensor(rng, 2, 70), B: testutil.RandTensor(rng, 40, 2)}})
	base := func(name, cfg string) string {
		dir := filepath.Join(root, name)
		writeFP8Base(t, dir, cfg, rng)
		return dir
	}
	good := base("good", fp8Config)
	plain := writeTestBase(t, filepath.Join(root, "plain"), `{}`, safetensors.F32, map[string]*testutil.Tensor{"model.q.weight": testutil.RandTensor(rng, 40, 70)})
	cases := []struct {
		name string
		opts Options
		want string
	}{
		{"gptq", Options{Base: base("gptq", `{"quantization_config": {"quant_method": "gptq"}}`), DType: "bf16"}, "GPTQ is not supported yet (it is next"},
		{"awq", Options{Base: base("awq", `{"quantization_config": {"quant_method": "awq"}}`), KeepFormat: true}, "AWQ is not supported yet"},
		{"no choice", Options{Base: good}, "pass dtype"},
		{"both", Options{Base: good, DType: "bf16", KeepFormat: true}, "one of the two"},
		{"keep on plain", Options{Base: plain, KeepFormat: true}, "is not quantized"},
		{"w16 without reference", Options{Base: good, DType: "bf16", MergeBase: "w16"}, "needs reference_base"},
		{"block does not cover", Options{Base: base("blocks", `{"quantization_config": {"quant_method": "fp8", "weight_block_size": [16, 32]}}`), DType: "bf16"},
			"weight_scale_inv has shape [2 3]; the weight model.k.weight [40 70] in 16x32 blocks needs [3 3]"},
		{"bad block", Options{Base: base("badblock", `{"quantization_config": {"quant_method": "fp8", "weight_block_size": [0, 32]}}`), DType: "bf16"}, "weight_block_size"},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			out := filepath.Join(root, "out-"+strings.ReplaceAll(c.name, " ", "-"))
			c.opts.Adapters, c.opts.OutputDir = []string{ad}, out
			_, err := Fuse(context.Background(), c.opts, nil)
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			assert.Contains(t, err.Error(), c.want)
			assert.NoDirExists(t, out)
		})
	}
}
