package adapter

import (
	"encoding/json"
	"gomerge/gomerge/errs"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestParseConfig(t *testing.T) {
	c, err := ParseConfig("cfg", []byte(`{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true,
		"target_modules": ["q_proj", "v_proj"], "rank_pattern": {"q_proj": 4}, "alpha_pattern": {"v_proj": 2},
		"some_future_key": {"nested": [1, 2]}}`))
	require.NoError(t, err)
	assert.Equal(t, 8, c.R)
	assert.Equal(t, 16.0, c.LoraAlpha)
	assert.Equal(t, []string{"q_proj", "v_proj"}, c.TargetModules.Names)
	assert.Equal(t, 8, c.MaxRank())
	r, alpha := c.ModuleRankAlpha("model.layers.0.self_attn.q_proj")
	assert.Equal(t, 4, r)
	assert.Equal(t, 16.0, alpha)
	assert.InDelta(t, 16/math.Sqrt(4), c.Scaling(r, alpha), 1e-12)
	r, alpha = c.ModuleRankAlpha("model.layers.0.self_attn.v_proj")
	assert.Equal(t, 8, r)
	assert.Equal(t, 2.0, alpha)
	assert.Contains(t, c.Raw, "some_future_key")
}

func TestParseConfigErrors(t *testing.T) {
	tests := []struct {
		name, json, want string
	}{
		{"not json", `{`, "not a JSON object"},
		{"not lora", `{"peft_type": "IA3", "r": 8}`, `peft_type is "IA3"`},
		{"adalora", `{"peft_type": "ADALORA", "r": 8}`, "LoRA adapters only"},
		{"dora", `{"peft_type": "LORA", "r": 8, "use_dora": true}`, "DoRA"},
		{"lora bias", `{"peft_type": "LORA", "r": 8, "lora_bias": true}`, "lora_bias"},
		{"bad r", `{"peft_type": "LORA", "r": "eight"}`, `key "r"`},
		{"zero r", `{"peft_type": "LORA", "r": 0}`, "positive"},
		{"bad targets", `{"peft_type": "LORA", "r": 8, "target_modules": 3}`, "target_modules"},
		{"bad pattern", `{"peft_type": "LORA", "r": 8, "rank_pattern": {"(": 2}}`, "rank_pattern"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := ParseConfig("dir/adapter_config.json", []byte(tc.json))
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			assert.Contains(t, err.Error(), tc.want)
			assert.Contains(t, err.Error(), "dir/adapter_config.json")
		})
	}
}

func TestUnionTargetModules(t *testing.T) {
	list := func(names ...string) *Config {
		return &Config{TargetModules: TargetModules{Names: names}}
	}
	re := func(s string) *Config {
		return &Config{TargetModules: TargetModules{Regex: s, IsRegex: true}}
	}

	u, err := UnionTargetModules([]*Config{list("v", "q"), list("k", "q")}, []string{"a", "b"})
	require.NoError(t, err)
	assert.Equal(t, []string{"k", "q", "v"}, u.Names)

	u, err = UnionTargetModules([]*Config{re(`.*q`), re(`.*v`)}, []string{"a", "b"})
	require.NoError(t, err)
	b, _ := json.Marshal(u)
	assert.Equal(t, `"(.*q)|(.*v)"`, string(b))

	_, err = UnionTargetModules([]*Config{list("q"), re(`.*v`)}, []string{"a", "b"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "same target modules type")
}

func TestMergedConfigJSONKeepsUnknownKeys(t *testing.T) {
	c, err := ParseConfig("cfg", []byte(`{"peft_type": "LORA", "r": 8, "lora_alpha": 16, "use_rslora": true,
		"rank_pattern": {"q": 4}, "task_type": "CAUSAL_LM", "future": [1]}`))
	require.NoError(t, err)
	out, err := MergedConfigJSON(c, 12, TargetModules{Names: []string{"q", "v"}},
		Patterns{{Key: `a\.q`, Value: 4}}, Patterns{{Key: `a\.q`, Value: 4}}, nil)
	require.NoError(t, err)
	var m map[string]any
	require.NoError(t, json.Unmarshal(out, &m))
	assert.Equal(t, 12.0, m["r"])
	assert.Equal(t, 12.0, m["lora_alpha"])
	assert.Equal(t, false, m["use_rslora"])
	assert.Equal(t, "CAUSAL_LM", m["task_type"])
	assert.Equal(t, []any{1.0}, m["future"])
	assert.Equal(t, map[string]any{`a\.q`: 4.0}, m["rank_pattern"])
	assert.Equal(t, []any{"q", "v"}, m["target_modules"])
}
