package bindings

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func wait(t *testing.T, id int64) status {
	t.Helper()
	for {
		var s status
		require.NoError(t, json.Unmarshal([]byte(MergeWait(id, 1000)), &s))
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
		{"wrong field type", `{"adapters": "x"}`, "TypeError", "invalid merge request"},
		{"missing adapter", `{"adapters": ["/nonexistent/a"], "weights": [1], "output_dir": "/tmp/x"}`, "FileNotFoundError", "/nonexistent/a"},
		{"bad type", `{"adapters": ["a", "b"], "weights": [1, 1], "combination_type": "nope", "output_dir": "o"}`, "ValueError", "combination_type"},
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
	require.NoError(t, json.Unmarshal([]byte(MergeWait(987654, 0)), &s))
	assert.Equal(t, "ValueError", s.Error.Kind)
	MergeCancel(987654) // no-op, no panic
}

func TestInspectAdapterMissing(t *testing.T) {
	var s status
	require.NoError(t, json.Unmarshal([]byte(InspectAdapter("/nonexistent/adapter")), &s))
	assert.Equal(t, "FileNotFoundError", s.Error.Kind)
}
