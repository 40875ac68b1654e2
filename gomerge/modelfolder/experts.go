package modelfolder

import "slices"

// ExpertLayout is one of transformers' conversions of a fused
// mixture-of-experts parameter (mlp.experts.gate_up_proj [E, 2I, H], as the
// model holds it in memory) from per-expert tensors on disk: Rename turns
// the module path in memory into the one on disk ("" : the same), and
// Pieces lists, per parameter, the per-expert weights concatenated along
// the output dimension, in order.
type ExpertLayout struct {
	Name   string
	Models []string  // the config model_types transformers converts so
	Rename [2]string // memory substring -> disk substring
	Pieces map[string][]string
}

// ExpertLayouts follow transformers 5.24's conversion_mapping.py: "mixtral"
// (also minimax: w1/w3 -> gate_up_proj, w2 -> down_proj, block_sparse_moe ->
// mlp) and "qwen2_moe" (qwen3_moe, deepseek_v2/v3, glm4_moe, olmoe and the
// other models mapped to it: gate_proj/up_proj -> gate_up_proj, down_proj).
var ExpertLayouts = []ExpertLayout{
	{Name: "mixtral", Models: []string{"mixtral", "minimax", "minimax_m2"},
		Rename: [2]string{".mlp.experts", ".block_sparse_moe.experts"},
		Pieces: map[string][]string{"gate_up_proj": {"w1", "w3"}, "down_proj": {"w2"}}},
	{Name: "qwen2_moe", Models: []string{"qwen2_moe", "afmoe", "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1",
		"ernie4_5_moe", "glm4_moe", "glm4_moe_lite", "glm_moe_dsa", "glm4v_moe", "longcat_flash", "solar_open", "mellum",
		"qwen3_moe", "beam", "qwen3_omni_moe", "qwen3_omni_moe_thinker", "qwen3_omni_moe_text", "qwen3_next",
		"hunyuan_v1_moe", "flex_olmo", "olmoe", "sarvam_mla", "exaone_moe", "cohere2_moe"},
		Pieces: map[string][]string{"gate_up_proj": {"gate_proj", "up_proj"}, "down_proj": {"down_proj"}}},
}

// ExpertLayoutsFor returns the layouts transformers applies to a model type.
func ExpertLayoutsFor(modelType string) []ExpertLayout {
	var out []ExpertLayout
	for _, l := range ExpertLayouts {
		if slices.Contains(l.Models, modelType) {
			out = append(out, l)
		}
	}
	return out
}

// TransposedExperts are the model types whose fused expert parameters are
// stored input dimension first ([E, in, out]: transformers'
// is_transposed, for which PEFT does not swap in and out).
var TransposedExperts = []string{"gpt_oss"}

// ModelType is the config's model_type ("" when absent).
func (f *Folder) ModelType() string {
	s, _ := f.config["model_type"].(string)
	return s
}
