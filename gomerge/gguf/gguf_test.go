package gguf

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

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/kernels"
)

func TestPermuteRows(t *testing.T) {
	for _, tc := range []struct {
		rows, n int
		order   []int // source row of each destination row
	}{
		{4, 1, []int{0, 2, 1, 3}},
		{8, 2, []int{0, 2, 1, 3, 4, 6, 5, 7}},
		{8, 1, []int{0, 4, 1, 5, 2, 6, 3, 7}},
		{2, 1, []int{0, 1}},
	} {
		src := make([]float32, tc.rows*3)
		for i := range src {
			src[i] = float32(i)
		}
		dst := make([]float32, len(src))
		require.NoError(t, permuteRows(dst, src, tc.rows, 3, tc.n))
		for r, from := range tc.order {
			assert.Equal(t, src[from*3:from*3+3], dst[r*3:r*3+3], "rows=%d n=%d row %d", tc.rows, tc.n, r)
		}
	}
	assert.Error(t, permuteRows(make([]float32, 6), make([]float32, 6), 6, 1, 2))
}

func TestQuantizeQ8_0(t *testing.T) {
	x := make([]float32, 64)
	for i := range 32 {
		x[i] = float32(i) - 15.5 // the second block stays zero
	}
	q := quantizeQ8_0(nil, x)
	require.Len(t, q, 2*q8BlockSize)
	d := float32(15.5) / 127 // max |x|
	assert.Equal(t, kernels.Float32ToHalf(d), binary.LittleEndian.Uint16(q[:2]))
	id := 1 / d
	for i := range 32 {
		want := int8(math.Round(float64(x[i] * id)))
		assert.Equal(t, want, int8(q[2+i]), "value %d", i)
	}
	assert.Equal(t, int8(-127), int8(q[2]))
	assert.Equal(t, int8(127), int8(q[2+31]))
	assert.Equal(t, make([]byte, q8BlockSize), q[q8BlockSize:], "a zero block has d = 0 and q = 0")
}

func TestHeaderAlignsTensors(t *testing.T) {
	tensors := []TensorInfo{
		{Name: "a", Dims: []int{3, 5}, Type: TypeF32},
		{Name: "b", Dims: []int{32, 2}, Type: TypeQ8_0},
		{Name: "c", Dims: []int{7}, Type: TypeF16},
	}
	h, size := Header([]KV{{"general.type", "adapter"}, {"adapter.lora.alpha", float32(0)}, {"n", uint32(7)}}, tensors)
	assert.Equal(t, "GGUF", string(h[:4]))
	assert.Equal(t, uint32(3), binary.LittleEndian.Uint32(h[4:]))
	assert.Equal(t, uint64(3), binary.LittleEndian.Uint64(h[8:]))
	assert.Equal(t, uint64(3), binary.LittleEndian.Uint64(h[16:]))
	assert.Zero(t, len(h)%Alignment)
	assert.Equal(t, []int64{0, 64, 160}, []int64{tensors[0].Offset, tensors[1].Offset, tensors[2].Offset})
	assert.Equal(t, int64(192), size)
}

func writeConfig(t *testing.T, dir, text string) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	require.NoError(t, os.WriteFile(filepath.Join(dir, "config.json"), []byte(text), 0o644))
	return dir
}

func TestReadBase(t *testing.T) {
	root := t.TempDir()
	for _, tc := range []struct {
		name, config, arch, err string
		tied                    bool
		kv                      int
	}{
		{"llama", `{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2}`, "llama", "", false, 2},
		{"mistral", `{"architectures": ["MistralForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4}`, "llama", "", false, 4},
		{"gemma3", `{"architectures": ["Gemma3ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4}`, "gemma3", "", true, 4},
		{"qwen2 tied", `{"architectures": ["Qwen2ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": true}`, "qwen2", "", true, 4},
		{"gpt2", `{"architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_head": 4}`, "gpt2", "", true, 4},
		{"gemma2 untied", `{"architectures": ["Gemma2ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4, "tie_word_embeddings": false}`, "gemma2", "", true, 4},
		{"unknown", `{"architectures": ["FalconForCausalLM"], "num_hidden_layers": 2}`, "", `architecture "FalconForCausalLM"`, false, 0},
		{"no arch", `{"num_hidden_layers": 2}`, "", `no "architectures"`, false, 0},
		{"no layers", `{"architectures": ["Qwen3ForCausalLM"], "num_attention_heads": 4}`, "", "num_hidden_layers", false, 0},
		{"not json", `[1]`, "", "not a JSON object", false, 0},
	} {
		dir := writeConfig(t, filepath.Join(root, tc.name), tc.config)
		b, err := ReadBase(dir)
		if tc.err != "" {
			require.Error(t, err, tc.name)
			assert.Contains(t, err.Error(), tc.err, tc.name)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			continue
		}
		require.NoError(t, err, tc.name)
		assert.Equal(t, tc.arch, b.Arch.Name, tc.name)
		assert.Equal(t, tc.tied, b.Tied, tc.name)
		assert.Equal(t, tc.kv, b.HeadsKV, tc.name)
	}
	_, err := ReadBase(filepath.Join(root, "missing"))
	assert.Equal(t, errs.KindFileNotFound, errs.KindOf(err))
}

func TestTensorNames(t *testing.T) {
	root := t.TempDir()
	llama, err := ReadBase(writeConfig(t, filepath.Join(root, "l"), `{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4}`))
	require.NoError(t, err)
	phi, err := ReadBase(writeConfig(t, filepath.Join(root, "p"), `{"architectures": ["Phi3ForCausalLM"], "num_hidden_layers": 2, "num_attention_heads": 4}`))
	require.NoError(t, err)
	gpt2, err := ReadBase(writeConfig(t, filepath.Join(root, "g"), `{"architectures": ["GPT2LMHeadModel"], "n_layer": 2, "n_head": 4}`))
	require.NoError(t, err)
	for _, tc := range []struct {
		base         *Base
		module, want string
		err          string
	}{
		{llama, "model.layers.1.self_attn.q_proj", "blk.1.attn_q.weight", ""},
		{llama, "model.layers.0.mlp.down_proj", "blk.0.ffn_down.weight", ""},
		{llama, "model.embed_tokens", "token_embd.weight", ""},
		{llama, "lm_head", "output.weight", ""},
		{llama, "model.layers.2.self_attn.q_proj", "", "the base ("},
		{llama, "model.layers.01.self_attn.q_proj", "", "no LoRA slot"},
		{llama, "model.layers.0.self_attn.rotary", "", "no LoRA slot"},
		{phi, "model.layers.1.self_attn.qkv_proj", "blk.1.attn_qkv.weight", ""},
		{phi, "model.layers.1.mlp.gate_up_proj", "blk.1.ffn_up.weight", ""},
		{gpt2, "transformer.h.0.attn.c_attn", "blk.0.attn_qkv.weight", ""},
		{gpt2, "transformer.h.1.mlp.c_proj", "blk.1.ffn_down.weight", ""},
		{gpt2, "transformer.wte", "token_embd.weight", ""},
	} {
		got, err := tc.base.TensorName(tc.module)
		if tc.err != "" {
			require.Error(t, err, tc.module)
			assert.Contains(t, err.Error(), tc.err)
			continue
		}
		require.NoError(t, err, tc.module)
		assert.Equal(t, tc.want, got)
	}
}

// readGGUF parses the tensor infos of a file written by Export (names, dims, types, offsets) and its data start.
func readGGUF(t *testing.T, path string) (map[string]TensorInfo, []byte, int64) {
	t.Helper()
	b, err := os.ReadFile(path)
	require.NoError(t, err)
	le := binary.LittleEndian
	pos := 8
	nt, nkv := int(le.Uint64(b[pos:])), int(le.Uint64(b[pos+8:]))
	pos += 16
	str := func() string {
		n := int(le.Uint64(b[pos:]))
		s := string(b[pos+8 : pos+8+n])
		pos += 8 + n
		return s
	}
	for range nkv {
		str()
		switch le.Uint32(b[pos:]) {
		case kvString:
			pos += 4
			str()
		default:
			pos += 8
		}
	}
	out := map[string]TensorInfo{}
	for range nt {
		name := str()
		nd := int(le.Uint32(b[pos:]))
		pos += 4
		ti := TensorInfo{Name: name}
		for range nd {
			ti.Dims = append(ti.Dims, int(le.Uint64(b[pos:])))
			pos += 8
		}
		ti.Type = GGMLType(le.Uint32(b[pos:]))
		ti.Offset = int64(le.Uint64(b[pos+4:]))
		pos += 12
		out[name] = ti
	}
	return out, b, align(int64(pos))
}

func TestExportScalesPermutesAndTransposes(t *testing.T) {
	root := t.TempDir()
	base := writeConfig(t, filepath.Join(root, "base"), `{"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1}`)
	rng := rand.New(rand.NewPCG(1, 2))
	q := testutil.Module{A: testutil.RandTensor(rng, 2, 8), B: testutil.RandTensor(rng, 8, 2)}
	emb := testutil.Module{A: testutil.RandTensor(rng, 2, 10), B: testutil.RandTensor(rng, 8, 2), Embed: true}
	ad := testutil.WriteAdapter(t, filepath.Join(root, "ad"), map[string]any{"r": 2, "lora_alpha": 3, "use_rslora": true,
		"target_modules": []string{"q_proj", "embed_tokens"}}, map[string]testutil.Module{
		"model.layers.0.self_attn.q_proj": q, "model.embed_tokens": emb})
	out := filepath.Join(root, "out.gguf")
	res, err := Export(context.Background(), Options{Adapter: ad, Base: base, Output: out}, nil)
	require.NoError(t, err)
	assert.Equal(t, 2, res.Modules)
	infos, data, start := readGGUF(t, out)
	f32 := func(name string) []float32 {
		ti := infos[name]
		raw := data[start+ti.Offset : start+ti.Offset+ti.Size()]
		v := make([]float32, len(raw)/4)
		for i := range v {
			v[i] = math.Float32frombits(binary.LittleEndian.Uint32(raw[4*i:]))
		}
		return v
	}
	s := 3 / math.Sqrt(2)
	assert.Equal(t, []int{8, 2}, infos["blk.0.attn_q.weight.lora_a"].Dims)
	assert.Equal(t, q.A.Data, f32("blk.0.attn_q.weight.lora_a"))
	bq := f32("blk.0.attn_q.weight.lora_b")
	for r, from := range []int{0, 2, 1, 3, 4, 6, 5, 7} { // 2 heads of 4 rows
		for k := range 2 {
			assert.Equal(t, float32(float64(q.B.Data[from*2+k])*s), bq[r*2+k])
		}
	}
	assert.Equal(t, []int{2, 10}, infos["token_embd.weight.lora_a"].Dims)
	ae := f32("token_embd.weight.lora_a")
	for k := range 2 {
		for c := range 10 {
			assert.Equal(t, emb.A.Data[k*10+c], ae[c*2+k])
		}
	}
	assert.Equal(t, []int{2, 8}, infos["token_embd.weight.lora_b"].Dims)

	// an existing output is kept unless overwrite, and a failed export leaves nothing
	_, err = Export(context.Background(), Options{Adapter: ad, Base: base, Output: out}, nil)
	assert.Equal(t, errs.KindFileExists, errs.KindOf(err))
	_, err = Export(context.Background(), Options{Adapter: ad, Base: base, Output: filepath.Join(root, "x.gguf"), DType: "q4"}, nil)
	assert.Equal(t, errs.KindValue, errs.KindOf(err))
	entries, _ := os.ReadDir(root)
	assert.Len(t, entries, 3) // base, ad, out.gguf
}
