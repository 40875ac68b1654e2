package adapter

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestPatternsResolve(t *testing.T) {
	p, err := ParsePatterns(json.RawMessage(`{"q_proj": 4, "layers.1.mlp.down_proj": 12, "proj": 2, "model.*\\.v_proj": 6}`))
	require.NoError(t, err)
	tests := []struct {
		module string
		want   float64
		ok     bool
	}{
		{"model.layers.0.self_attn.q_proj", 4, true},        // suffix after a dot
		{"model.layers.1.mlp.down_proj", 12, true},          // dotted key
		{"model.layers.11.mlp.down_proj", 0, false},         // not layers.1, and "proj" is not a whole component
		{"model.layers.0.mlp.up_proj", 0, false},            // "proj" must be a whole dotted component
		{"model.layers.0.self_attn.v_proj", 6, true},        // regex key
		{"q_proj", 4, true},                                 // no prefix at all
		{"model.layers.0.self_attn.xq_proj", 0, false},      // not after a dot
		{"model.layers.0.self_attn.q_proj.extra", 0, false}, // must end the path
	}
	for _, tc := range tests {
		t.Run(tc.module, func(t *testing.T) {
			v, ok := p.Resolve(tc.module)
			assert.Equal(t, tc.ok, ok)
			if tc.ok {
				assert.Equal(t, tc.want, v)
			}
		})
	}
}

func TestPatternsFirstMatchWinsInJSONOrder(t *testing.T) {
	a, err := ParsePatterns(json.RawMessage(`{"q_proj": 4, ".*": 16}`))
	require.NoError(t, err)
	b, err := ParsePatterns(json.RawMessage(`{".*": 16, "q_proj": 4}`))
	require.NoError(t, err)
	va, _ := a.Resolve("model.q_proj")
	vb, _ := b.Resolve("model.q_proj")
	assert.Equal(t, 4.0, va)
	assert.Equal(t, 16.0, vb)
	out, err := json.Marshal(b)
	require.NoError(t, err)
	assert.Equal(t, `{".*":16,"q_proj":4}`, string(out))
}

func TestPatternsErrors(t *testing.T) {
	for _, raw := range []string{`[1]`, `{"a": "x"}`, `{"(": 1}`, `{"(?<=x)a": 1}`} {
		_, err := ParsePatterns(json.RawMessage(raw))
		assert.Error(t, err, raw)
	}
	p, err := ParsePatterns(json.RawMessage(`null`))
	require.NoError(t, err)
	assert.Empty(t, p)
}
