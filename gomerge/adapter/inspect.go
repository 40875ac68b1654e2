package adapter

import (
	"sort"
	"strconv"

	"gomerge/gomerge/safetensors"
)

// AdapterInfo summarises an adapter directory.
type AdapterInfo struct {
	Dir           string         `json:"dir"`
	BaseModel     string         `json:"base_model"`
	R             int            `json:"r"`
	LoraAlpha     float64        `json:"lora_alpha"`
	UseRslora     bool           `json:"use_rslora"`
	Scaling       float64        `json:"scaling"` // of r and lora_alpha: alpha / r, or alpha / sqrt(r) with rsLoRA
	Ranks         map[string]int `json:"ranks"`   // rank -> number of modules, keys as strings
	TargetModules TargetModules  `json:"target_modules"`
	DType         string         `json:"dtype"`
	Modules       int            `json:"modules"`
	Parameters    int64          `json:"parameters"`
	Extra         []string       `json:"extra_tensors"`
	// UseDora and LoraBias: DoRA magnitudes and LoRA biases, which merges
	// refuse and fuses apply.
	UseDora  bool `json:"use_dora"`
	LoraBias bool `json:"lora_bias"`
}

// Inspect loads an adapter directory and summarises it; DoRA adapters and
// LoRA biases are described too (as a fuse reads them).
func Inspect(dir string) (*AdapterInfo, error) {
	as, err := LoadAll([]string{dir}, true)
	if err != nil {
		return nil, err
	}
	a := as[0]
	defer a.Close()
	info := &AdapterInfo{Dir: dir, BaseModel: a.Config.BaseModel, R: a.Config.R, LoraAlpha: a.Config.LoraAlpha,
		UseRslora: a.Config.UseRslora, Scaling: a.Config.Scaling(a.Config.R, a.Config.LoraAlpha), TargetModules: a.Config.TargetModules, DType: a.DType.TorchName(),
		Modules: len(a.Modules), Ranks: map[string]int{}, Extra: a.Extra}
	if info.Extra == nil {
		info.Extra = []string{}
	}
	info.UseDora, info.LoraBias = a.Config.UseDora, a.Config.LoraBias
	for _, m := range a.Modules {
		info.UseDora = info.UseDora || m.Magnitude.Shape != nil
		info.LoraBias = info.LoraBias || m.Bias.Shape != nil
		info.Ranks[strconv.Itoa(m.Rank)]++
		info.Parameters += int64(safetensors.Numel(m.RawA.Shape) + safetensors.Numel(m.RawB.Shape))
	}
	sort.Strings(info.Extra)
	return info, nil
}
