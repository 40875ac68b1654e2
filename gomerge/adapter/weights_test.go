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
		{"gradient for every module", `[[0, 1]]`, Weights{perModule(".*", []float64{0, 1})}},
		{"command-line strings", `["2", "0:1", "mlp=1,.*=0:0.5"]`,
			Weights{{Value: 2}, perModule(".*", []float64{0, 1}), perModule("mlp", 1.0, ".*", []float64{0, 0.5})}},
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
		{"true", `[1, true]`, `weights[1]: expected a number, a list of numbers (a gradient), a list of {"pattern": ..., "weight": ...} entries or a string PATTERN=W[,PATTERN=W...], got true`},
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
		{"gradient for every module, of strings", `[[0, "x"]]`, `weights[0]: gradient value 1 is not a number: "x"`},
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

// TestWeightsJSONValueErrors: a value of the right JSON type that is wrong
// (a bad command-line string, a non-finite number) is a ValueError.
func TestWeightsJSONValueErrors(t *testing.T) {
	tests := []struct {
		name, raw, want string
	}{
		{"nan", `[1, "nan"]`, `weights[1]: nan is not a finite number`},
		{"inf in a pattern", `[[{"pattern": ".*", "weight": "-inf"}]]`, `weights[0]: pattern '.*': -inf is not a finite number`},
		{"inf in a gradient", `[[{"pattern": ".*", "weight": [0, "inf"]}]]`, `weights[0]: pattern '.*': inf is not a finite number`},
		{"pattern twice", `[[{"pattern": "a", "weight": 1}, {"pattern": "a", "weight": 2}]]`, `weights[0]: pattern 'a' is given twice`},
		{"bad string", `[1, "mlp=x"]`, `weights[1]: pattern 'mlp': 'x' is not a number or a gradient A:B[:C...] of numbers`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var got Weights
			err := json.Unmarshal([]byte(tc.raw), &got)
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			assert.Equal(t, tc.want, err.Error())
		})
	}
}

// TestParseWeight: the command line's PATTERN=W[,PATTERN=W...] form.
func TestParseWeight(t *testing.T) {
	tests := []struct {
		text string
		want Weight
	}{
		{"2", Weight{Value: 2}},
		{"-0.5", Weight{Value: -0.5}},
		{"0:0.5:1", perModule(".*", []float64{0, 0.5, 1})},
		{`self_attn\..*=1,mlp\..*=0`, perModule(`self_attn\..*`, 1.0, `mlp\..*`, 0.0)},
		{"q{1,2}=1,.*=0", perModule("q{1,2}", 1.0, ".*", 0.0)}, // a comma inside a pattern
		{".*=-1:1", perModule(".*", []float64{-1, 1})},
		{"a=b=2", perModule("a=b", 2.0)}, // the last "=" separates the weight
	}
	for _, tc := range tests {
		t.Run(tc.text, func(t *testing.T) {
			got, err := ParseWeight(tc.text)
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

func TestParseWeightErrors(t *testing.T) {
	tests := []struct {
		text, want string
	}{
		{"x", "'x' is not a number or a gradient A:B[:C...] of numbers"},
		{"a=x", "pattern 'a': 'x' is not a number or a gradient A:B[:C...] of numbers"},
		{"a=1,junk", "'a=1,junk': expected PATTERN=W[,PATTERN=W...], got 'junk'"},
		{"a=1,a=2", "pattern 'a' is given twice"},
		{"=1", "'=1': expected PATTERN=W[,PATTERN=W...], got '=1'"},
		{"0:x", "'0:x' is not a number or a gradient A:B[:C...] of numbers"},
		{"a=nan", "pattern 'a': nan is not a finite number"},
		{"1e999", "1e999 is not a finite number"},
	}
	for _, tc := range tests {
		t.Run(tc.text, func(t *testing.T) {
			_, err := ParseWeight(tc.text)
			require.Error(t, err)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
			assert.Equal(t, tc.want, err.Error())
		})
	}
}

func TestCheckWeight(t *testing.T) {
	tests := []struct {
		name, raw, want string
		kind            errs.ErrKind
	}{
		{"good", `"mlp=1,.*=0"`, "", ""},
		{"decoding", `[{"pattern": 1, "weight": 1}]`, "weights[3]: entry 0: expected", errs.KindType},
		{"compiling", `"(=1"`, `weights[3]: pattern "(" is not a regular expression`, errs.KindValue},
		{"empty", `[]`, "weights[3]: an empty list", errs.KindValue},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, err := CheckWeight(3, []byte(tc.raw))
			if tc.want == "" {
				require.NoError(t, err)
				assert.True(t, w.Patterns[0].Compiled())
				return
			}
			require.Error(t, err)
			assert.Equal(t, tc.kind, errs.KindOf(err))
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
		{"no patterns", Weight{Patterns: []WeightPattern{}}, "weights[2]: an empty list; give a number"},
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
