package extract

// Writing the adapter: its tensors, adapter_config.json and the card, committed atomically.

import (
	"context"
	"encoding/json"
	"fmt"
	"regexp"
	"sort"
	"strings"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// write writes the adapter atomically (adapter.CreateOutput): its tensors,
// adapter_config.json and, unless turned off, the model card.
func write(ctx context.Context, opts Options, base *modelfolder.Folder, rule linalg.RankRule, res *Result, f *adapterFiles) error {
	pending, err := adapter.CreateOutput(opts.OutputDir, opts.Overwrite)
	if err != nil {
		return err
	}
	committed := false
	defer func() {
		if !committed {
			pending.Abort()
		}
	}()
	weightsPath, err := pending.Path(adapter.WeightsFile)
	if err != nil {
		return err
	}
	if err := writeTensors(weightsPath, f.outs, f.data); err != nil {
		return err
	}
	cfg, err := extractConfigJSON(opts, base, res, f)
	if err != nil {
		return err
	}
	if err := pending.WriteFile(adapter.ConfigFile, cfg); err != nil {
		return err
	}
	if opts.ModelCard == nil || *opts.ModelCard {
		if err := pending.WriteFile("README.md", []byte(extractCard(opts, rule, res))); err != nil {
			return err
		}
	}
	if err := ctx.Err(); err != nil {
		return errs.ErrCancelled
	}
	if err := pending.Commit(); err != nil {
		return err
	}
	committed = true
	return nil
}

// writeTensors writes a safetensors file of the given tensors.
func writeTensors(path string, outs []safetensors.OutTensor, data [][]byte) error {
	w, err := safetensors.Create(path, outs, map[string]string{"format": "pt"})
	if err != nil {
		return err
	}
	for i, t := range outs {
		if err = w.WriteTensor(t.Name, data[i]); err != nil {
			break
		}
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return err
}

// extractConfigJSON is the adapter_config.json of an extracted adapter.
func extractConfigJSON(opts Options, base *modelfolder.Folder, res *Result, f *adapterFiles) ([]byte, error) {
	targets, ranks, fanIn := f.targets, f.ranks, f.fanIn
	var pattern adapter.Patterns
	for i, t := range targets {
		if ranks[i] != res.Rank {
			pattern = append(pattern, adapter.PatternEntry{Key: regexp.QuoteMeta(t), Value: float64(ranks[i])})
		}
	}
	params := make([]string, 0, len(f.pranks))
	for p := range f.pranks {
		params = append(params, p)
	}
	sort.Strings(params)
	for _, p := range params { // a parameter's rank resolves on its path (PEFT's current_key)
		if f.pranks[p] != res.Rank {
			pattern = append(pattern, adapter.PatternEntry{Key: regexp.QuoteMeta(p), Value: float64(f.pranks[p])})
		}
	}
	if targets == nil {
		targets = []string{}
	}
	if pattern == nil {
		pattern = adapter.Patterns{}
	}
	baseName := opts.BaseName
	if baseName == "" {
		baseName = opts.Base
	}
	var taskType any
	archs, _ := base.Config()["architectures"].([]any)
	for _, a := range archs {
		if s, _ := a.(string); strings.HasSuffix(s, "ForCausalLM") || strings.HasSuffix(s, "LMHeadModel") {
			taskType = "CAUSAL_LM"
		}
	}
	var toSave any
	if len(res.ModulesToSave) > 0 {
		toSave = res.ModulesToSave
	}
	cfg := map[string]any{
		"peft_type":               "LORA",
		"base_model_name_or_path": baseName,
		"task_type":               taskType,
		"r":                       res.Rank,
		"lora_alpha":              res.Rank,
		"rank_pattern":            pattern,
		"alpha_pattern":           pattern,
		"target_modules":          targets,
		"modules_to_save":         toSave,
		"use_rslora":              false,
		"use_dora":                false,
		"fan_in_fan_out":          fanIn,
		"lora_dropout":            0.0,
		"bias":                    "none",
		"init_lora_weights":       true,
		"inference_mode":          true,
	}
	if len(f.params) > 0 { // adapters without expert parameters keep the config they had
		cfg["target_parameters"] = f.params
	}
	b, err := json.MarshalIndent(cfg, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("extracted config: %w", err)
	}
	return append(b, '\n'), nil
}
