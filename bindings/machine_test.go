package bindings

import (
	"encoding/json"
	"testing"

	"github.com/stretchr/testify/require"

	"gomerge/gomerge/kernels"
)

// KernelRates measures every set this CPU runs, with positive rates, and
// refuses bad requests with a ValueError.
func TestKernelRates(t *testing.T) {
	var got struct {
		Cores int    `json:"cores"`
		InUse string `json:"in_use"`
		Sets  map[string]struct {
			FMA32One  struct{ Wall float64 }  `json:"fma32_one_core"`
			FMA64All  struct{ Wall float64 }  `json:"fma64_all_cores"`
			Gemm32All *struct{ Wall float64 } `json:"gemm32_all_cores"`
		} `json:"sets"`
	}
	require.NoError(t, json.Unmarshal([]byte(KernelRates(`{"seconds": 0.001, "gemm": [9, 40, 30]}`)), &got))
	require.Equal(t, kernels.InUse(), got.InUse)
	require.Positive(t, got.Cores)
	require.Len(t, got.Sets, len(kernels.Runnable()))
	for _, name := range kernels.Runnable() {
		s := got.Sets[name]
		require.Positive(t, s.FMA32One.Wall, name)
		require.Positive(t, s.FMA64All.Wall, name)
		require.NotNil(t, s.Gemm32All, name)
		require.Positive(t, s.Gemm32All.Wall, name)
	}
	for request, want := range map[string]string{
		`{"gemm": [1, 2]}`:    "gemm must be [m, n, k]",
		`{"sets": ["nope"]}`:  "not in this build",
		`{"seconds": "x"}`:    "bad request",
		`{"gemm": [4, 0, 4]}`: "all positive",
	} {
		var st status
		require.NoError(t, json.Unmarshal([]byte(KernelRates(request)), &st))
		require.Equal(t, "error", st.State, request)
		require.Equal(t, "ValueError", st.Error.Kind, request)
		require.Contains(t, st.Error.Message, want, request)
	}
}
