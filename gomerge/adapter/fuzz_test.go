package adapter

import (
	"encoding/json"
	"gomerge/gomerge/errs"
	"math"
	"testing"
)

// FuzzParseConfig: any adapter_config.json is refused with a ValueError or
// gives a usable config.
func FuzzParseConfig(f *testing.F) {
	for _, s := range []string{
		`{"peft_type":"LORA","r":8,"lora_alpha":16,"target_modules":["q_proj"],"rank_pattern":{"q":4},"alpha_pattern":{"v":2}}`,
		`{"peft_type":"LORA","r":8,"target_modules":".*proj","use_rslora":true}`,
		`{"peft_type":"IA3"}`, `[]`, `{"peft_type":"LORA","r":-1}`, `{"peft_type":"LORA","r":4,"rank_pattern":{"(":1}}`,
		`{"peft_type":"LORA","r":4,"rank_pattern":{"a":1e308}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := ParseConfig("fuzz.json", data)
		if err != nil {
			if errs.KindOf(err) != errs.KindValue && errs.KindOf(err) != errs.KindFileNotFound {
				t.Fatalf("unexpected error kind: %v", err)
			}
			return
		}
		c.MaxRank()
		r, alpha := c.ModuleRankAlpha("model.layers.0.q_proj")
		c.Scaling(max(r, 1), alpha)
		if _, err := MergedConfigJSON(c, 8, c.TargetModules, c.RankPattern, c.AlphaPattern, nil); err != nil {
			t.Fatalf("a parsed config cannot be written back: %v", err)
		}
	})
}

// FuzzPatternResolve: any rank_pattern key either compiles or is refused,
// and resolving any module path never panics.
func FuzzPatternResolve(f *testing.F) {
	for _, s := range [][2]string{{"q_proj", "model.layers.0.q_proj"}, {"layers.1.mlp.down_proj", "a.layers.1.mlp.down_proj"},
		{".*", ""}, {"(", "x"}, {`\`, "x"}, {"a{1000}", "aaa"}, {"(?i)Q", "q"}} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, key, module string) {
		raw, _ := json.Marshal(map[string]int{key: 4})
		p, err := ParsePatterns(raw)
		if err != nil {
			return
		}
		if v, ok := p.Resolve(module); ok && v != 4 {
			t.Fatalf("resolved %v", v)
		}
	})
}

func FuzzWeightsJSON(f *testing.F) {
	for _, s := range [][2]string{
		{`[1, -2.5]`, "model.layers.0.q_proj"},
		{`[[{"pattern": "q_proj", "weight": 2}, {"pattern": ".*", "weight": [0, 1]}]]`, "model.layers.3.mlp.up_proj"},
		{`[[{"pattern": "(", "weight": 1}]]`, "x"},
		{`[[{"pattern": ".*", "weight": []}]]`, "a.1.b"},
		{`[[{"pattern": ".*", "weight": [1e308, -1e308]}]]`, "a.99999999999999999999.b"},
		{`[[]]`, ""}, {`[null]`, ""}, {`[[{"pattern": ".*"}]]`, ""},
		{`["q{1,2}=1,.*=0:1", [0, 2], "nan", "a=b=2"]`, "m.3.q1"}, {`[[{"pattern": "a", "weight": "-inf"}]]`, "a"},
	} {
		f.Add(s[0], s[1])
	}
	f.Fuzz(func(t *testing.T, raw, module string) {
		var ws Weights
		if err := json.Unmarshal([]byte(raw), &ws); err != nil {
			return
		}
		back, err := json.Marshal(ws)
		if err != nil {
			t.Fatalf("marshal: %v", err)
		}
		var again Weights
		if err := json.Unmarshal(back, &again); err != nil || len(again) != len(ws) {
			t.Fatalf("round trip of %s: %v", back, err)
		}
		for i, w := range ws {
			c, err := w.Compile(i)
			if err != nil {
				continue
			}
			if v, err := c.Resolve(i, "dir", module, LayerCount([]string{module, "m.7.x"})); err == nil && (math.IsNaN(v) || math.IsInf(v, 0)) {
				t.Fatalf("weight %v for %q", v, module)
			}
		}
	})
}
