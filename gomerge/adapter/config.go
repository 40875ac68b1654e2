package adapter

import (
	"encoding/json"
	"errors"
	"fmt"
	"gomerge/gomerge/errs"
	"io/fs"
	"math"
	"os"
	"sort"
)

// TargetModules is PEFT's target_modules: a list of names or one regex.
type TargetModules struct {
	Names   []string
	Regex   string
	IsRegex bool
}

// Config is a parsed adapter_config.json. Raw keeps every key,
// including the ones gomerge does not interpret, so that a merged config
// carries them over as PEFT does.
type Config struct {
	Raw           map[string]json.RawMessage
	PeftType      string
	R             int
	LoraAlpha     float64
	UseRslora     bool
	FanInFanOut   bool
	TargetModules TargetModules
	// TargetParameters is PEFT's target_parameters: nn.Parameter paths
	// adapted by lora.ParamWrapper (params.go).
	TargetParameters []string
	RankPattern      Patterns
	AlphaPattern     Patterns
	BaseModel        string
	// UseDora and LoraBias are only accepted when fusing into a base model
	// (merges refuse them).
	UseDora  bool
	LoraBias bool
}

// ReadConfig reads and validates an adapter_config.json.
func ReadConfig(path string) (*Config, error) {
	data, err := readConfigFile(path)
	if err != nil {
		return nil, err
	}
	return ParseConfig(path, data)
}

// readConfigForFuse is ReadConfig accepting DoRA and LoRA biases.
func readConfigForFuse(path string) (*Config, error) {
	data, err := readConfigFile(path)
	if err != nil {
		return nil, err
	}
	return parseConfig(path, data)
}

func readConfigFile(path string) ([]byte, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errs.New(errs.KindFileNotFound, "%s: no such file (is this a PEFT adapter directory?)", path)
		}
		return nil, errs.IO(path, err)
	}
	return data, nil
}

// ParseConfig parses the JSON of an adapter config; path only names it in errors.
func ParseConfig(path string, data []byte) (*Config, error) {
	c, err := parseConfig(path, data)
	if err != nil {
		return nil, err
	}
	if c.UseDora {
		return nil, errs.Value("%s: use_dora is true; DoRA adapters are not supported (their magnitude vectors cannot be merged this way)", path)
	}
	if c.LoraBias {
		return nil, errs.Value("%s: lora_bias is true; adapters with LoRA biases are not supported", path)
	}
	return c, nil
}

// parseConfig parses an adapter config, DoRA and LoRA biases included.
func parseConfig(path string, data []byte) (*Config, error) {
	c := &Config{}
	if err := json.Unmarshal(data, &c.Raw); err != nil || c.Raw == nil {
		return nil, errs.Value("%s: not a JSON object: %v", path, err)
	}
	field := func(key string, dst any) error {
		raw, ok := c.Raw[key]
		if !ok || string(raw) == "null" {
			return nil
		}
		if err := json.Unmarshal(raw, dst); err != nil {
			return errs.Value("%s: key %q has an invalid value %s", path, key, truncate(string(raw), 80))
		}
		return nil
	}
	var alpha float64
	for _, f := range []struct {
		key string
		dst any
	}{
		{"peft_type", &c.PeftType}, {"r", &c.R}, {"lora_alpha", &alpha}, {"use_rslora", &c.UseRslora},
		{"fan_in_fan_out", &c.FanInFanOut}, {"use_dora", &c.UseDora}, {"lora_bias", &c.LoraBias},
		{"base_model_name_or_path", &c.BaseModel},
	} {
		if err := field(f.key, f.dst); err != nil {
			return nil, err
		}
	}
	c.LoraAlpha = alpha
	if c.PeftType != "LORA" {
		return nil, errs.Value("%s: peft_type is %q; gomerge merges LoRA adapters only (peft_type \"LORA\")", path, c.PeftType)
	}
	if c.R <= 0 {
		return nil, errs.Value("%s: key \"r\" must be a positive integer", path)
	}
	if _, ok := c.Raw["lora_alpha"]; !ok {
		c.LoraAlpha = 8 // PEFT's default
	}
	if raw, ok := c.Raw["target_modules"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &c.TargetModules.Regex); err == nil {
			c.TargetModules.IsRegex = true
		} else if err := json.Unmarshal(raw, &c.TargetModules.Names); err != nil {
			return nil, errs.Value("%s: target_modules must be a list of names or a regex string", path)
		}
	}
	if raw, ok := c.Raw["target_parameters"]; ok && string(raw) != "null" {
		if err := json.Unmarshal(raw, &c.TargetParameters); err != nil {
			return nil, errs.Value("%s: target_parameters must be a list of parameter names", path)
		}
	}
	var err error
	if c.RankPattern, err = ParsePatterns(c.Raw["rank_pattern"]); err != nil {
		return nil, errs.Value("%s: rank_pattern: %v", path, err)
	}
	if c.AlphaPattern, err = ParsePatterns(c.Raw["alpha_pattern"]); err != nil {
		return nil, errs.Value("%s: alpha_pattern: %v", path, err)
	}
	return c, nil
}

// MaxRank is PEFT's rank of an adapter for add_weighted_adapter:
// max(r, *rank_pattern.values()).
func (c *Config) MaxRank() int {
	r := c.R
	for _, e := range c.RankPattern {
		r = max(r, int(e.Value))
	}
	return r
}

// ModuleRankAlpha resolves the rank and alpha of a module path through
// rank_pattern and alpha_pattern (independently, first match wins).
func (c *Config) ModuleRankAlpha(module string) (int, float64) {
	r, alpha := c.R, c.LoraAlpha
	if v, ok := c.RankPattern.Resolve(module); ok {
		r = int(v)
	}
	if v, ok := c.AlphaPattern.Resolve(module); ok {
		alpha = v
	}
	return r, alpha
}

// Scaling returns alpha/r, or alpha/sqrt(r) with use_rslora.
func (c *Config) Scaling(r int, alpha float64) float64 {
	if c.UseRslora {
		return alpha / math.Sqrt(float64(r))
	}
	return alpha / float64(r)
}

// UnionTargetModules merges target_modules as PEFT does: the union of name
// sets, or "(re0)|(re1)|..." for regex strings. Mixing the kinds is an error.
func UnionTargetModules(cfgs []*Config, names []string) (TargetModules, error) {
	var out TargetModules
	isRegex := cfgs[0].TargetModules.IsRegex
	set := map[string]bool{}
	for i, c := range cfgs {
		if c.TargetModules.IsRegex != isRegex {
			return out, errs.Value("adapters: %s and %s: all adapter configs should follow the same target modules type; "+
				"combining adapters with target_modules being a mix of list and string is not supported", names[0], names[i])
		}
		if isRegex {
			if i > 0 {
				out.Regex += "|"
			}
			out.Regex += "(" + c.TargetModules.Regex + ")"
		}
		for _, n := range c.TargetModules.Names {
			set[n] = true
		}
	}
	out.IsRegex = isRegex
	if !isRegex {
		for n := range set {
			out.Names = append(out.Names, n)
		}
		sort.Strings(out.Names)
	}
	return out, nil
}

// MarshalJSON writes a list or a string.
func (t TargetModules) MarshalJSON() ([]byte, error) {
	if t.IsRegex {
		return json.Marshal(t.Regex)
	}
	if t.Names == nil {
		return []byte("[]"), nil
	}
	return json.Marshal(t.Names)
}

func truncate(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// MergedConfigJSON builds the merged adapter's config from adapter 0's raw
// config: r = lora_alpha = rank, the given target modules and patterns, and
// use_rslora false (the scaling of every source is folded into the factors).
func MergedConfigJSON(base *Config, rank int, targets TargetModules, rankPattern, alphaPattern Patterns, extra map[string]any) ([]byte, error) {
	out := make(map[string]any, len(base.Raw)+4)
	for k, v := range base.Raw {
		out[k] = v
	}
	out["r"] = rank
	out["lora_alpha"] = rank
	out["target_modules"] = targets
	if rankPattern == nil {
		rankPattern = Patterns{}
	}
	if alphaPattern == nil {
		alphaPattern = Patterns{}
	}
	out["rank_pattern"] = rankPattern
	out["alpha_pattern"] = alphaPattern
	out["use_rslora"] = false
	for k, v := range extra {
		out[k] = v
	}
	b, err := json.MarshalIndent(out, "", "  ")
	if err != nil {
		return nil, fmt.Errorf("merged config: %w", err)
	}
	return append(b, '\n'), nil
}
