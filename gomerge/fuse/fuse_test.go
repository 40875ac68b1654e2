package fuse

import (
	"context"
	"encoding/binary"
	"math"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// addLowRank adds s B A in the base tensor's layout: out x in normally,
// (B A)^T (in x out) for fan_in_fan_out and embeddings.
func TestAddLowRankLayouts(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	randn := func(n int) []float32 {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		return x
	}
	cases := []struct {
		name            string
		out, in, r      int
		transposed      bool
		s               float32
		rowsOfW, colsOf int
	}{
		{"linear", 7, 5, 3, false, 0.5, 7, 5},
		{"fan_in_fan_out", 7, 5, 3, true, 2, 5, 7},
		{"rank 1", 4, 9, 1, false, -1, 4, 9},
		{"embedding", 6, 11, 2, true, 1.5, 11, 6},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a, b := randn(c.r*c.in), randn(c.out*c.r)
			w := randn(c.rowsOfW * c.colsOf)
			want := make([]float64, len(w))
			for i := 0; i < c.out; i++ {
				for j := 0; j < c.in; j++ {
					d := 0.0
					for k := 0; k < c.r; k++ {
						d += float64(b[i*c.r+k]) * float64(a[k*c.in+j])
					}
					idx := i*c.in + j
					if c.transposed {
						idx = j*c.out + i
					}
					want[idx] = float64(w[idx]) + float64(c.s)*d
				}
			}
			addLowRank(w, a, b, c.rowsOfW, c.colsOf, c.r, c.s, c.transposed, safetensors.F32)
			for i := range w {
				assert.Equal(t, float32(want[i]), w[i], "element %d", i)
			}
		})
	}
}

// The output is rounded once, to nearest with ties to even, as torch does.
func TestBF16RoundingToNearestEven(t *testing.T) {
	bits := func(b uint32) float32 { return math.Float32frombits(b) }
	cases := []struct {
		name string
		in   float32
		want uint16
	}{
		{"exact", 1, 0x3f80},
		{"below half rounds down", bits(0x3f807fff), 0x3f80},
		{"tie to even (down)", bits(0x3f808000), 0x3f80},
		{"tie to even (up)", bits(0x3f818000), 0x3f82},
		{"above half rounds up", bits(0x3f808001), 0x3f81},
		{"negative tie", bits(0xbf818000), 0xbf82},
		{"overflow to inf", bits(0x7f7fffff), 0x7f80},
		{"nan stays nan", float32(math.NaN()), 0x7fc0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := binary.LittleEndian.Uint16(encodeOutput(safetensors.BF16, []float32{c.in}))
			if c.name == "nan stays nan" {
				assert.Equal(t, uint16(0x7f80), got&0x7f80)
				assert.NotZero(t, got&0x7f)
				return
			}
			assert.Equal(t, c.want, got)
		})
	}
	x := []float32{1.5, -2.25}
	assert.Equal(t, safetensors.Float32AsBytes(x), encodeOutput(safetensors.F32, x), "float32 is written as it is")
}

// The float32 value of a float64 sum is kept off the output dtype's
// midpoints, so that the final rounding is that of the exact sum.
func TestToFloat32ForRoundsOnce(t *testing.T) {
	cases := []struct {
		name string
		v    float64
		dt   safetensors.DType
		want float32 // v rounded to dt directly
	}{
		{"bf16 just above a midpoint", 1 + 0x1p-8 + 0x1p-30, safetensors.BF16, 1 + 0x1p-7},
		{"bf16 just below a midpoint", 1 + 3*0x1p-8 - 0x1p-30, safetensors.BF16, 1 + 0x1p-7},
		{"bf16 exact midpoint ties to even", 1 + 0x1p-8, safetensors.BF16, 1},
		{"negative bf16", -(1 + 0x1p-8 + 0x1p-30), safetensors.BF16, -(1 + 0x1p-7)},
		{"f16 just above a midpoint", 1 + 0x1p-11 + 0x1p-30, safetensors.F16, 1 + 0x1p-10},
		{"f16 exact midpoint", 1 + 0x1p-11, safetensors.F16, 1},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			naive := safetensors.Round(c.dt, float32(c.v))
			got := safetensors.Round(c.dt, toFloat32For(c.v, c.dt))
			assert.Equal(t, c.want, got)
			if c.v != float64(float32(c.v)) && c.name != "bf16 exact midpoint ties to even" {
				assert.NotEqual(t, c.want, naive, "the case must catch double rounding")
			}
		})
	}
	assert.Equal(t, float32(1.5), toFloat32For(1.5, safetensors.F32))
}

// DoRA rescales each output (a row, or a column when transposed) to its
// magnitude.
func TestScaleByNorm(t *testing.T) {
	for _, transposed := range []bool{false, true} {
		w := []float32{3, 4, 0, 5, 12, 0} // 2 x 3
		mag := []float32{10, 26}
		n := 2
		if transposed {
			w = []float32{3, 5, 4, 12, 0, 0} // 3 x 2: the outputs are the columns
		}
		scaleByNorm(w, append([]float32(nil), w...), mag[:n], map[bool]int{false: 2, true: 3}[transposed],
			map[bool]int{false: 3, true: 2}[transposed], transposed)
		want := []float32{6, 8, 0, 10, 24, 0}
		if transposed {
			want = []float32{6, 10, 8, 24, 0, 0}
		}
		require.InDeltaSlice(t, want, w, 1e-5, "transposed=%v", transposed)
	}
}

// writeTestBase writes a model folder: config.json and one model.safetensors
// holding the given float32 tensors stored as dtype.
func writeTestBase(t *testing.T, dir string, cfg string, dt safetensors.DType, tensors map[string]*testutil.Tensor) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(cfg), 0o644))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte(`{}`), 0o644))
	raw := map[string]safetensors.RawTensor{}
	for name, x := range tensors {
		raw[name] = safetensors.RawTensor{DType: dt, Shape: x.Shape, Data: safetensors.Encode(dt, x.Data)}
	}
	require.NoError(t, testutil.WriteSafetensors(filepath.Join(dir, "model.safetensors"), raw, map[string]string{"format": "pt"}))
	return dir
}

func readFolder(t *testing.T, dir string) map[string][]float32 {
	t.Helper()
	f, err := modelfolder.Open(dir)
	require.NoError(t, err)
	defer f.Close()
	out := map[string][]float32{}
	for _, n := range f.Names() {
		x, _, err := f.ReadFloat32(n)
		require.NoError(t, err)
		out[n] = x
	}
	return out
}

// Fuse end to end on a small model folder: W + s B A in each layout, the
// untouched tensors copied bit for bit, tied embeddings untied, dry runs
// and the errors that write nothing.
func TestFuse(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	const d, v, r = 8, 12, 2
	tensors := map[string]*testutil.Tensor{
		"model.embed_tokens.weight": testutil.RandTensor(rng, v, d),
		"model.q.weight":            testutil.RandTensor(rng, d, d),
		"model.up.weight":           testutil.RandTensor(rng, d, 16), // fan_in_fan_out layout: in x out
		"model.norm.weight":         testutil.RandTensor(rng, d),
	}
	root := t.TempDir()
	tied := writeTestBase(t, filepath.Join(root, "tied"), `{"tie_word_embeddings": true}`, safetensors.BF16, tensors)
	mods := map[string]testutil.Module{
		"model.q":            {A: testutil.RandTensor(rng, r, d), B: testutil.RandTensor(rng, d, r)},
		"model.embed_tokens": {A: testutil.RandTensor(rng, r, v), B: testutil.RandTensor(rng, d, r), Embed: true},
	}
	ad := testutil.WriteAdapter(t, filepath.Join(root, "a"), map[string]any{"r": r, "lora_alpha": 4,
		"target_modules": []string{"q", "embed_tokens"}}, mods)
	up := testutil.Module{A: testutil.RandTensor(rng, r, d), B: testutil.RandTensor(rng, 16, r)}
	fifo := testutil.WriteAdapter(t, filepath.Join(root, "fifo"), map[string]any{"r": r, "lora_alpha": 2, "fan_in_fan_out": true,
		"target_modules": []string{"up"}}, map[string]testutil.Module{"model.up": up})

	out := filepath.Join(root, "out")
	res, err := Fuse(context.Background(), Options{Base: tied, Adapters: []string{ad, fifo}, Stack: true, OutputDir: out}, nil)
	require.NoError(t, err)
	assert.True(t, res.Untied)
	got, base := readFolder(t, out), readFolder(t, tied)
	exact := func(w []float32, a, b *testutil.Tensor, s float64, rows, cols int, transposed bool) []float32 {
		want := make([]float32, len(w))
		for i := 0; i < rows; i++ {
			for j := 0; j < cols; j++ {
				sum := 0.0
				for k := 0; k < r; k++ {
					if transposed { // w[i,j] gains (B A)[j,i]
						sum += float64(b.Data[j*r+k]) * float64(a.Data[k*rows+i])
					} else {
						sum += float64(b.Data[i*r+k]) * float64(a.Data[k*cols+j])
					}
				}
				want[i*cols+j] = safetensors.Round(safetensors.BF16, float32(float64(w[i*cols+j])+s*sum))
			}
		}
		return want
	}
	assert.Equal(t, exact(base["model.q.weight"], mods["model.q"].A, mods["model.q"].B, 2, d, d, false), got["model.q.weight"])
	assert.Equal(t, exact(base["model.embed_tokens.weight"], mods["model.embed_tokens"].A, mods["model.embed_tokens"].B, 2, v, d, true),
		got["model.embed_tokens.weight"])
	assert.Equal(t, exact(base["model.up.weight"], up.A, up.B, 1, d, 16, true), got["model.up.weight"])
	assert.Equal(t, base["model.embed_tokens.weight"], got["lm_head.weight"], "lm_head keeps the base matrix")
	assert.Equal(t, base["model.norm.weight"], got["model.norm.weight"])
	cfg, err := os.ReadFile(filepath.Join(out, "config.json"))
	require.NoError(t, err)
	assert.Contains(t, string(cfg), `"tie_word_embeddings": false`)
	assert.FileExists(t, filepath.Join(out, "tokenizer.json"))
	assert.FileExists(t, filepath.Join(out, "README.md"))

	errCases := []struct {
		name string
		opts Options
		kind errs.ErrKind
		want string
	}{
		{"exists", Options{Base: tied, Adapters: []string{ad}, OutputDir: out}, errs.KindFileExists, "already exists"},
		{"no base", Options{Base: filepath.Join(root, "nope"), Adapters: []string{ad}, OutputDir: filepath.Join(root, "o1")}, errs.KindFileNotFound, "nope"},
		{"weights", Options{Base: tied, Adapters: []string{ad}, Weights: adapter.ScalarWeights(1, 2), OutputDir: filepath.Join(root, "o2")}, errs.KindValue, "weights"},
		{"fifo shape", Options{Base: writeTestBase(t, filepath.Join(root, "b2"), `{}`, safetensors.F32, map[string]*testutil.Tensor{
			"model.up.weight": testutil.RandTensor(rng, 16, d)}), Adapters: []string{fifo}, OutputDir: filepath.Join(root, "o3")}, errs.KindValue, "fan_in_fan_out"},
		{"no base tensor", Options{Base: writeTestBase(t, filepath.Join(root, "b3"), `{}`, safetensors.F32, map[string]*testutil.Tensor{
			"model.q.weight": testutil.RandTensor(rng, d, d)}), Adapters: []string{ad}, OutputDir: filepath.Join(root, "o4")}, errs.KindValue, "model.embed_tokens"},
		{"dora merged", Options{Base: tied, Adapters: []string{ad, writeDoraAdapter(t, filepath.Join(root, "dora"), rng)},
			OutputDir: filepath.Join(root, "o5")}, errs.KindValue, "DoRA"},
	}
	for _, c := range errCases {
		t.Run(c.name, func(t *testing.T) {
			_, err := Fuse(context.Background(), c.opts, nil)
			require.Error(t, err)
			assert.Equal(t, c.kind, errs.KindOf(err), err.Error())
			assert.Contains(t, err.Error(), c.want)
			if c.name != "exists" {
				assert.NoDirExists(t, c.opts.OutputDir)
			}
		})
	}
	dry, err := Fuse(context.Background(), Options{Base: tied, Adapters: []string{ad}, DryRun: true, OutputDir: filepath.Join(root, "dry")}, nil)
	require.NoError(t, err)
	assert.Len(t, dry.Changed, 3) // q, the embedding and the untied lm_head
	assert.NoDirExists(t, filepath.Join(root, "dry"))
	entries, _ := os.ReadDir(root)
	for _, e := range entries {
		assert.False(t, modelfolder.IsTemp(e.Name()), "temporary folder left: %s", e.Name())
	}
}

// writeDoraAdapter writes a DoRA adapter on model.q (magnitude vector included).
func writeDoraAdapter(t *testing.T, dir string, rng *rand.Rand) string {
	testutil.WriteAdapter(t, dir, map[string]any{"r": 2, "lora_alpha": 4, "use_dora": true, "target_modules": []string{"q"}},
		map[string]testutil.Module{"model.q": {A: testutil.RandTensor(rng, 2, 8), B: testutil.RandTensor(rng, 8, 2)}})
	path := filepath.Join(dir, adapter.WeightsFile)
	st, err := safetensors.Open(path)
	require.NoError(t, err)
	tensors := map[string]safetensors.RawTensor{}
	for name := range st.Entries {
		x, err := st.ReadFloat32(name)
		require.NoError(t, err)
		tensors[name] = safetensors.RawTensor{DType: safetensors.F32, Shape: st.Entries[name].Shape, Data: safetensors.Encode(safetensors.F32, x)}
	}
	st.Close()
	tensors[adapter.KeyPrefix+"model.q.lora_magnitude_vector"] = safetensors.RawTensor{DType: safetensors.F32, Shape: []int{8}, Data: safetensors.Encode(safetensors.F32, testutil.RandTensor(rng, 8).Data)}
	require.NoError(t, testutil.WriteSafetensors(path, tensors, map[string]string{"format": "pt"}))
	return dir
}
