package gguf

import (
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"

	"gomerge/gomerge/errs"
)

// Arch is a base architecture whose LoRA adapters llama.cpp applies. The
// tensor names are those of gguf-py's tensor_mapping (the gguf package that
// llama.cpp's converters use), where each Hugging Face module becomes
// <gguf name>.weight and its factors <gguf name>.weight.lora_a / .lora_b.
type Arch struct {
	Name string   // general.architecture, as llama.cpp names it
	HF   []string // the config.json "architectures" entries it covers
	// LayerPrefix starts the module paths of the repeated blocks
	// ("model.layers." then the block index); Layer maps a module path
	// inside a block to its gguf name without "blk.N.".
	LayerPrefix string
	Layer       map[string]string
	Global      map[string]string // module paths outside the blocks -> gguf name
	// PermuteQK: llama.cpp's converter permutes the rows of Wq and Wk for
	// its RoPE layout (LlamaModel.permute), so B's rows are permuted too.
	PermuteQK bool
	// TiedDefault is tie_word_embeddings when config.json does not say
	// (the transformers config class's default). NoOutput: llama.cpp's
	// converter never writes an output tensor (Gemma's filter_tensors drops
	// lm_head), so lm_head counts as tied whatever the config says.
	TiedDefault bool
	NoOutput    bool
	// EmbeddingScaled: transformers scales the embedding inside the
	// embedding module (Gemma's ScaledWordEmbedding), so PEFT adds the LoRA
	// of embed_tokens unscaled while llama.cpp scales it with the base's:
	// such a LoRA cannot be written exactly.
	EmbeddingScaled bool
}

var llamaLayer = map[string]string{
	"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
	"self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
	"mlp.down_proj": "ffn_down",
}

var llamaGlobal = map[string]string{"model.embed_tokens": "token_embd", "lm_head": "output"}

// Archs is the table of supported architectures, by llama.cpp's name.
var Archs = []Arch{
	{Name: "llama", HF: []string{"LlamaForCausalLM", "MistralForCausalLM"}, LayerPrefix: "model.layers.",
		Layer: llamaLayer, Global: llamaGlobal, PermuteQK: true},
	{Name: "qwen2", HF: []string{"Qwen2ForCausalLM"}, LayerPrefix: "model.layers.", Layer: llamaLayer, Global: llamaGlobal},
	{Name: "qwen3", HF: []string{"Qwen3ForCausalLM"}, LayerPrefix: "model.layers.", Layer: llamaLayer, Global: llamaGlobal},
	{Name: "gemma2", HF: []string{"Gemma2ForCausalLM"}, LayerPrefix: "model.layers.", Layer: llamaLayer,
		Global: llamaGlobal, TiedDefault: true, NoOutput: true, EmbeddingScaled: true},
	{Name: "gemma3", HF: []string{"Gemma3ForCausalLM"}, LayerPrefix: "model.layers.", Layer: llamaLayer,
		Global: llamaGlobal, TiedDefault: true, NoOutput: true, EmbeddingScaled: true},
	{Name: "phi3", HF: []string{"Phi3ForCausalLM"}, LayerPrefix: "model.layers.", Layer: map[string]string{
		"self_attn.qkv_proj": "attn_qkv", "self_attn.o_proj": "attn_output",
		"mlp.gate_up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
	}, Global: llamaGlobal},
	{Name: "gpt2", HF: []string{"GPT2LMHeadModel"}, LayerPrefix: "transformer.h.", Layer: map[string]string{
		"attn.c_attn": "attn_qkv", "attn.c_proj": "attn_output", "mlp.c_fc": "ffn_up", "mlp.c_proj": "ffn_down",
	}, Global: map[string]string{"transformer.wte": "token_embd", "lm_head": "output"}, TiedDefault: true},
}

// supported lists the config.json architectures of the table, sorted.
func supported() string {
	var names []string
	for _, a := range Archs {
		names = append(names, a.HF...)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}

// Base is what the export reads from the base model's config.json.
type Base struct {
	Path     string // the config.json read
	Arch     *Arch
	HFArch   string
	Blocks   int
	Heads    int
	HeadsKV  int
	Tied     bool
	Hidden   int
	VocabLen int
}

// ReadBase reads a base model's config.json (path is the file or the model
// folder holding it) and finds its architecture in Archs; an architecture
// the table lacks is refused by name.
func ReadBase(path string) (*Base, error) {
	if st, err := os.Stat(path); err == nil && st.IsDir() {
		path = filepath.Join(path, "config.json")
	}
	data, err := os.ReadFile(path)
	if err != nil {
		if os.IsNotExist(err) {
			return nil, errs.New(errs.KindFileNotFound, "base: %s: no such file (pass the base model's folder or its config.json)", path)
		}
		return nil, errs.IO(path, err)
	}
	var cfg map[string]any
	if err := json.Unmarshal(data, &cfg); err != nil || cfg == nil {
		return nil, errs.Value("base: %s is not a JSON object", path)
	}
	if _, ok := cfg["text_config"].(map[string]any); ok && cfg["num_hidden_layers"] == nil {
		return nil, errs.Value("base: %s describes a multimodal model (text_config); pass the config of its text model", path)
	}
	archs, _ := cfg["architectures"].([]any)
	if len(archs) == 0 {
		return nil, errs.Value("base: %s has no \"architectures\" entry; llama.cpp's architecture cannot be told", path)
	}
	hf, _ := archs[0].(string)
	b := &Base{Path: path, HFArch: hf}
	for i := range Archs {
		for _, name := range Archs[i].HF {
			if name == hf {
				b.Arch = &Archs[i]
			}
		}
	}
	if b.Arch == nil {
		return nil, errs.Value("base: architecture %q (%s) is not supported by the GGUF export; supported: %s", hf, path, supported())
	}
	intKey := func(keys ...string) (int, bool) {
		for _, k := range keys {
			if v, ok := cfg[k].(float64); ok && v == float64(int(v)) && v > 0 {
				return int(v), true
			}
		}
		return 0, false
	}
	var ok bool
	if b.Blocks, ok = intKey("num_hidden_layers", "n_layer"); !ok {
		return nil, errs.Value("base: %s has no positive num_hidden_layers", path)
	}
	if b.Heads, ok = intKey("num_attention_heads", "n_head"); !ok {
		return nil, errs.Value("base: %s has no positive num_attention_heads", path)
	}
	if b.HeadsKV, ok = intKey("num_key_value_heads"); !ok {
		b.HeadsKV = b.Heads
	}
	b.Hidden, _ = intKey("hidden_size", "n_embd")
	b.VocabLen, _ = intKey("vocab_size")
	b.Tied = b.Arch.TiedDefault
	if v, ok := cfg["tie_word_embeddings"].(bool); ok {
		b.Tied = v
	}
	b.Tied = b.Tied || b.Arch.NoOutput
	return b, nil
}

// TensorName is the gguf name of the base weight that module (a PEFT
// module path, without "base_model.model.") adapts, as gguf-py's
// tensor_mapping names it for this architecture ("blk.3.attn_q.weight").
func (b *Base) TensorName(module string) (string, error) {
	a := b.Arch
	if name, ok := a.Global[module]; ok {
		return name + ".weight", nil
	}
	if rest, ok := strings.CutPrefix(module, a.LayerPrefix); ok {
		idx, inner, _ := strings.Cut(rest, ".")
		bid, err := strconv.Atoi(idx)
		if name, known := a.Layer[inner]; known && err == nil && bid >= 0 && strconv.Itoa(bid) == idx {
			if bid >= b.Blocks {
				return "", errs.Value("module %s: block %d, but the base (%s) has %d blocks", module, bid, b.Path, b.Blocks)
			}
			return fmt.Sprintf("blk.%d.%s.weight", bid, name), nil
		}
	}
	return "", errs.Value("module %s has no LoRA slot in llama.cpp's %s architecture (it maps %s)", module, a.Name, a.modules())
}

// modules describes the module paths the architecture maps, for errors.
func (a *Arch) modules() string {
	var names []string
	for m := range a.Global {
		names = append(names, m)
	}
	for m := range a.Layer {
		names = append(names, a.LayerPrefix+"N."+m)
	}
	sort.Strings(names)
	return strings.Join(names, ", ")
}
