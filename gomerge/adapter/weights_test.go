package adapter

import (
	"encoding/json"
	"gomerge/gomerge/errs"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func perModule(pairs ...any) Weight {
	w := Weight{Patterns: []WeightPattern{}}
	for i := 0; i < len(pairs); i += 2 {
		p := WeightPattern{Pattern: pairs[i].(string)}
		switch v := pairs[i+1].(type) {
		case float64:
			p.Weight = v
		case []float64:
			p.Gradient = v
		}
		w.Patterns = append(w.Patterns, p)
	}
	return w
}

func TestWeightsJSON(t *testing.T) {
	tests := []struct {
		name string
		raw  string
		want Weights
	}{
		{"numbers", `[2, -0.5, 1e-3]`, ScalarWeights(2, -0.5, 1e-3)},
		{"patterns keep their order", `[[{"pattern": "mlp\\..*", "weight": 0}, {"pattern": ".*", "weight": 1}], 3]`,
			Weights{perModule(`mlp\..*`, 0.0, ".*", 1.0), {Value: 3}}},
		{"gradient", `[[{"pattern": ".*", "weight": [0, 0.5, 1]}]]`, Weights{perModule(".*", []float64{0, 0.5, 1})}},
		{"empty list", `[[]]`, Weights{{Patterns: []WeightPattern{}}}},
		{"null", `null`, nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got Weights
			require.NoError(t, json.Unmarshal([]byte(tc.raw), &got))
			assert.Equal(t, tc.want, got)
			if tc.want == nil {
				return
			}
			back, err := json.Marshal(got) // the same form goes back in
			require.NoError(t, err)
			var again Weights
			require.NoError(t, json.Unmarshal(back, &again))
			assert.Equal(t, got, again)
		})
	}
}

func TestWeightsJSONErrors(t *testing.T) {
	tests := []struct {
		name, raw, want string
	}{
		{"string", `[1, "2"]`, `weights[1]: expected a number or a list of {"pattern": ..., "weight": ...} entries, got "2"`},
		{"null weight", `[null]`, `weights[0]: expected a number`},
		{"object", `[{"mlp": 1}]`, `weights[0]: expected a number`},
		{"not a list", `{"a": 1}`, `weights: expected a list`},
		{"unknown entry key", `[[{"pattern": ".*", "weight": 1, "extra": 2}]]`, `weights[0]: entry 0: expected {"pattern"`},
		{"missing weight", `[[{"pattern": ".*"}]]`, `weights[0]: entry 0`},
		{"missing pattern", `[[{"weight": 1}]]`, `weights[0]: entry 0`},
		{"pattern not a string", `[[{"pattern": 1, "weight": 1}]]`, `weights[0]: entry 0`},
		{"weight a string", `[1, [{"pattern": "mlp", "weight": "1"}]]`, `weights[1]: pattern 'mlp': the weight is not a number`},
		{"weight null", `[[{"pattern": "mlp", "weight": null}]]`, `pattern 'mlp': the weight is not a number`},
		{"gradient of strings", `[[{"pattern": ".*", "weight": [0, "1"]}]]`, `pattern '.*': gradient value 1 is not a number`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got Weights
			err := json.Unmarshal([]byte(tc.raw), &got)
			require.Error(t, err)
			assert.Equal(t, errs.KindType, errs.KindOf(err))
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestWeightCompileErrors(t *testing.T) {
	tests := []struct {
		name string
		w    Weight
		want string
	}{
		{"nan", Weight{Value: math.NaN()}, "weights[2]: NaN is not a finite number"},
		{"inf pattern", perModule(".*", math.Inf(1)), `weights[2]: pattern '.*': +Inf is not a finite number`},
		{"nan gradient", perModule(".*", []float64{0, math.NaN()}), `pattern '.*': gradient value NaN`},
		{"empty gradient", perModule(".*", []float64{}), "a gradient needs at least one value"},
		{"no patterns", Weight{Patterns: []WeightPattern{}}, "weights[2]: an empty list of patterns"},
		{"bad regex", perModule("mlp", 1.0, "self_attn(", 0.0), `weights[2]: pattern "self_attn(" is not a regular expression`},
		{"lookbehind", perModule("(?<=x)q", 1.0), `pattern "(?<=x)q"`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			_, err := tc.w.Compile(2)
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			assert.Contains(t, err.Error(), tc.want)
		})
	}
}

func TestWeightResolve(t *testing.T) {
	w, err := perModule(`.*self_attn\.q_proj`, 3.0, `self_attn\..*`, 1.0, `layers\.1\..*`, 0.5, `mlp\..*`, []float64{0, 1}, "lm_head", -1.0).Compile(0)
	require.NoError(t, err)
	tests := []struct {
		module string
		want   float64
	}{
		{"model.layers.0.self_attn.q_proj", 3},  // first match wins
		{"model.layers.1.self_attn.q_proj", 3},  // before layers.1
		{"model.layers.1.self_attn.v_proj", 1},  // self_attn before layers.1
		{"model.layers.1.mlp.up_proj", 0.5},     // layers.1 before the mlp gradient
		{"model.layers.0.mlp.up_proj", 0},       // gradient: layer 0 of 0..4
		{"model.layers.2.mlp.down_proj", 0.5},   // layer 2 of 0..4
		{"model.layers.4.mlp.gate_proj", 1},     // the last layer
		{"model.layers.3.mlp.gate_proj", 0.75},  // between
		{"lm_head", -1},                         // the whole name
		{"model.layers.10.self_attn.k_proj", 1}, // layers.10 is not layers.1
	}
	for _, tc := range tests {
		t.Run(tc.module, func(t *testing.T) {
			got, err := w.Resolve(0, "a", tc.module, 5)
			require.NoError(t, err)
			assert.InDelta(t, tc.want, got, 1e-12)
		})
	}
	scalar, err := Weight{Value: 2}.Resolve(0, "a", "anything", 1)
	require.NoError(t, err)
	assert.Equal(t, 2.0, scalar)
}

func TestWeightResolveErrors(t *testing.T) {
	tests := []struct {
		name   string
		w      Weight
		module string
		want   []string
	}{
		{"unmatched", perModule(`self_attn\..*`, 1.0, `layers\.0\..*`, 0.5), "model.layers.3.mlp.up_proj",
			[]string{"weights[1]: module model.layers.3.mlp.up_proj of adapter 1 (dir/b) matches none of its patterns",
				`'self_attn\..*', 'layers\.0\..*'`, "add a catch-all such as '.*'"}},
		{"a pattern inside the name", perModule("self_attn", 1.0, "mlp", 0.0), "model.layers.0.mlp.up_proj",
			[]string{"matches none", `'mlp' occurs inside model.layers.0.mlp.up_proj but does not end it; write '.*mlp.*'`}},
		{"alternation inside the name", perModule("mlp|attn", 1.0), "model.layers.0.mlp.up_proj",
			[]string{`write '.*(?:mlp|attn).*'`}},
		{"gradient without a layer", perModule(".*", []float64{0, 1}), "lm_head",
			[]string{`weights[1]: pattern '.*' gives module lm_head a gradient`, "no layer index"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, err := tc.w.Compile(1)
			require.NoError(t, err)
			_, err = w.Resolve(1, "dir/b", tc.module, 4)
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			for _, s := range tc.want {
				assert.Contains(t, err.Error(), s)
			}
		})
	}
}

func TestLayerIndexAndGradient(t *testing.T) {
	for module, want := range map[string]int{
		"model.layers.7.mlp.up_proj":   7,
		"transformer.h.11.attn.c_attn": 11,
		"encoder.block.2.layer.0.q":    2, // the first number
		"model.layers.007.q_proj":      7,
	} {
		got, ok := layerIndex(module)
		assert.True(t, ok, module)
		assert.Equal(t, want, got, module)
	}
	for _, module := range []string{"lm_head", "model.embed_tokens", "model.layers.x1.q", "model.layers.-1.q"} {
		_, ok := layerIndex(module)
		assert.False(t, ok, module)
	}
	assert.Equal(t, 12, LayerCount([]string{"lm_head", "transformer.h.11.attn", "transformer.h.3.mlp"}))
	assert.Equal(t, 1, LayerCount([]string{"lm_head"}))
	tests := []struct {
		g             []float64
		layer, layers int
		want          float64
	}{
		{[]float64{0, 1}, 0, 5, 0},
		{[]float64{0, 1}, 1, 5, 0.25},
		{[]float64{0, 1}, 4, 5, 1},
		{[]float64{0, 1, 0}, 2, 5, 1},
		{[]float64{0, 1, 0}, 3, 5, 0.5},
		{[]float64{2}, 3, 5, 2},
		{[]float64{0.2, 0.8}, 0, 1, 0.2}, // one layer: the first value
		{[]float64{1, 3}, 9, 5, 3},       // past the last layer: the last value
	}
	for _, tc := range tests {
		assert.InDelta(t, tc.want, gradientAt(tc.g, tc.layer, tc.layers), 1e-12, "%v at %d of %d", tc.g, tc.layer, tc.layers)
	}
}
