package bindings

import (
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/methods"
)

func wait(t *testing.T, id int64) status {
	t.Helper()
	for {
		var s status
		require.NoError(t, json.Unmarshal([]byte(JobWait(id, 1000)), &s))
		if s.State != "running" {
			return s
		}
	}
}

func TestMergeJobReportsErrorsAsJSON(t *testing.T) {
	tests := []struct {
		name, request, kind, want string
	}{
		{"not json", `{`, "TypeError", "invalid merge request"},
		{"wrong field type", `{"adapters": "x"}`, "TypeError", "adapters: expected a list, got string"},
		{"missing adapter", `{"adapters": ["/nonexistent/a"], "weights": [1], "output_dir": "/tmp/x"}`, "FileNotFoundError", "/nonexistent/a"},
		{"bad type", `{"adapters": ["a", "b"], "weights": [1, 1], "combination_type": "nope", "output_dir": "o"}`, "ValueError", "combination_type"},
		{"unknown key", `{"adapters": ["a"], "weights": [1], "densty": 0.2}`, "ValueError", `unknown key "densty"`},
		{"trailing data", `{"adapters": ["a"]} {}`, "TypeError", "trailing data"},
		{"option of another call", `{"adapters": ["a"], "weights": [1], "rank": 8}`, "ValueError", `unknown key "rank"`},
		{"weight not a number", `{"adapters": ["a", "b"], "weights": [1, true]}`, "TypeError", `weights[1]: expected a number`},
		{"weight a bad string", `{"adapters": ["a", "b"], "weights": [1, "x"]}`, "ValueError", `weights[1]: 'x' is not a number`},
		{"weight entry key", `{"adapters": ["a"], "weights": [[{"pattern": ".*", "wieght": 1}]]}`, "TypeError", `weights[0]: entry 0`},
		{"weight entry value", `{"adapters": ["a"], "weights": [[{"pattern": "mlp", "weight": "1"}]]}`, "TypeError", `pattern 'mlp'`},
		{"weight pattern regex", `{"adapters": ["a"], "weights": [[{"pattern": "(", "weight": 1}]], "output_dir": "o"}`, "ValueError", `weights[0]: pattern "("`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := wait(t, MergeStart(tc.request))
			assert.Equal(t, "error", s.State)
			require.NotNil(t, s.Error)
			assert.Equal(t, tc.kind, s.Error.Kind)
			assert.Contains(t, s.Error.Message, tc.want)
		})
	}
}

func TestMergeWaitUnknownJob(t *testing.T) {
	var s status
	require.NoError(t, json.Unmarshal([]byte(JobWait(987654, 0)), &s))
	assert.Equal(t, "ValueError", s.Error.Kind)
	JobCancel(987654) // no-op, no panic
}

func TestInspectAdapterMissing(t *testing.T) {
	var s status
	require.NoError(t, json.Unmarshal([]byte(InspectAdapter("/nonexistent/adapter")), &s))
	assert.Equal(t, "FileNotFoundError", s.Error.Kind)
}

func TestMergeTensorsRequestIsNarrow(t *testing.T) {
	s := wait(t, MergeTensorsStart(`{"combination_type": "linear", "rank": 8, "modules": [], "output_dir": "o"}`))
	require.NotNil(t, s.Error)
	assert.Equal(t, "ValueError", s.Error.Kind)
	assert.Contains(t, s.Error.Message, `unknown key "output_dir"`)
}

func TestRequestKeysAndMethods(t *testing.T) {
	var keys map[string][]string
	require.NoError(t, json.Unmarshal([]byte(RequestKeys()), &keys))
	assert.Contains(t, keys["merge"], "combination_type") // from the embedded Combine
	assert.Contains(t, keys["merge"], "output_dir")
	assert.Contains(t, keys["merge_tensors"], "density")
	assert.NotContains(t, keys["merge_tensors"], "output_dir")
}

// EngineMethods carries every row of the engine's method table, every field
// intact; it lists exactly the methods that the docs' table
// (docs/choosing-a-method.md) describes; and the engine accepts each name
// it lists in a request.
func TestEngineMethodsCarryTheTable(t *testing.T) {
	want, err := json.Marshal(methods.Methods())
	require.NoError(t, err)
	assert.JSONEq(t, string(want), EngineMethods())
	var got []struct {
		Name   string   `json:"name"`
		Params []string `json:"params"`
	}
	require.NoError(t, json.Unmarshal([]byte(EngineMethods()), &got))
	require.Len(t, got, len(methods.Methods()))
	doc, err := os.ReadFile("../docs/choosing-a-method.md")
	require.NoError(t, err)
	var documented, listed []string
	for _, line := range strings.Split(string(doc), "\n") {
		if cells := strings.Split(line, "|"); strings.HasPrefix(line, "| `") && len(cells) > 2 {
			for _, m := range regexp.MustCompile("`([a-z_]+)`").FindAllStringSubmatch(cells[1], -1) {
				documented = append(documented, m[1])
			}
		}
	}
	for _, m := range got {
		listed = append(listed, m.Name)
	}
	assert.ElementsMatch(t, documented, listed, "the methods of docs/choosing-a-method.md's table")
	for _, m := range got {
		require.NotEmpty(t, m.Name)
		req := fmt.Sprintf(`{"combination_type": %q, "rank": 8, "modules": []}`, m.Name)
		s := wait(t, MergeTensorsStart(req))
		if s.Error != nil {
			assert.NotContains(t, s.Error.Message, "combination_type: invalid value", m.Name)
		}
	}
	s := wait(t, MergeTensorsStart(`{"combination_type": "avg", "rank": 8, "modules": []}`))
	require.NotNil(t, s.Error, "an unknown method is refused")
	assert.Contains(t, s.Error.Message, "combination_type: invalid value")
}

func TestFuseJobReportsErrorsAsJSON(t *testing.T) {
	tests := []struct {
		name, request, kind, want string
	}{
		{"unknown key", `{"base": "b", "adapters": ["a"], "output_dir": "o", "stak": true}`, "ValueError", `unknown key "stak"`},
		{"wrong field type", `{"base": 1}`, "TypeError", "base: expected a string, got number"},
		{"no base", `{"adapters": ["a"], "output_dir": "o"}`, "ValueError", "base"},
		{"missing base", `{"base": "/nonexistent/b", "adapters": ["a"], "output_dir": "/tmp/gomerge-fuse-test-none"}`, "FileNotFoundError", "/nonexistent/b"},
		{"method with stack", `{"base": "b", "adapters": ["a", "c"], "combination_type": "ties", "stack": true, "output_dir": "o"}`, "ValueError", "stack"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := wait(t, FuseStart(tc.request))
			require.Equal(t, "error", s.State)
			require.NotNil(t, s.Error)
			assert.Equal(t, tc.kind, s.Error.Kind)
			assert.Contains(t, s.Error.Message, tc.want)
		})
	}
}

// EngineParams carries the parameter schema: every parameter a method
// lists, each a key of the merge requests, with its type and doc.
func TestEngineParamsCarryTheSchema(t *testing.T) {
	var params []struct {
		Name    string   `json:"name"`
		Type    string   `json:"type"`
		Default any      `json:"default"`
		Choices []string `json:"choices"`
		PEFT    bool     `json:"peft"`
		Doc     string   `json:"doc"`
	}
	require.NoError(t, json.Unmarshal([]byte(EngineParams()), &params))
	var keys map[string][]string
	require.NoError(t, json.Unmarshal([]byte(RequestKeys()), &keys))
	names := map[string]bool{}
	for _, p := range params {
		names[p.Name] = true
		assert.Contains(t, []string{"int", "float", "bool", "str", "rank"}, p.Type, p.Name)
		assert.NotEmpty(t, p.Doc, p.Name)
		for _, req := range []string{"merge", "merge_tensors", "fuse"} {
			assert.Contains(t, keys[req], p.Name, "%s requests take %s", req, p.Name)
		}
	}
	for _, m := range methods.Methods() {
		for _, p := range m.Params {
			assert.True(t, names[p], "%s's parameter %s is in the schema", m.Name, p)
		}
	}
}

// A value of the wrong type names its key: a TypeError, or a ValueError for
// an integer out of range.
func TestDecodeRequestNamesTheKey(t *testing.T) {
	for _, tc := range []struct {
		request string
		kind    errs.ErrKind
		msg     string
	}{
		{`{"density": "a"}`, errs.KindType, "density: expected a number, got string"},
		{`{"seed": -1}`, errs.KindValue, "seed: expected an integer in [0, 2**64), got -1"},
		{`{"max_rank": 2.5}`, errs.KindType, "max_rank: expected an integer, got the number 2.5"},
		{`{"svd_full_matrices": 1}`, errs.KindType, "svd_full_matrices: expected true or false, got number"},
		{`{"densty": 1}`, errs.KindValue, `invalid merge request: unknown key "densty"`},
	} {
		var o gomerge.Options
		err := decodeRequest(tc.request, &o)
		require.Error(t, err, tc.request)
		assert.Equal(t, tc.kind, errs.KindOf(err), tc.request)
		assert.Equal(t, tc.msg, err.Error(), tc.request)
	}
}

func TestCheckWeight(t *testing.T) {
	tests := []struct {
		name, weight, kind, message string
	}{
		{"good string", `"mlp=1,.*=0:1"`, "", ""},
		{"good entries", `[{"pattern": "mlp", "weight": 1}]`, "", ""},
		{"bad string", `"mlp=x"`, "ValueError", "weights[2]: pattern 'mlp': 'x' is not a number or a gradient A:B[:C...] of numbers"},
		{"wrong type", `true`, "TypeError", "weights[2]: expected a number"},
		{"bad pattern", `"(=1"`, "ValueError", `weights[2]: pattern "(" is not a regular expression`},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var s status
			require.NoError(t, json.Unmarshal([]byte(CheckWeight(2, tc.weight)), &s))
			if tc.kind == "" {
				assert.Nil(t, s.Error)
				return
			}
			require.NotNil(t, s.Error)
			assert.Equal(t, tc.kind, s.Error.Kind)
			assert.Contains(t, s.Error.Message, tc.message)
		})
	}
}
