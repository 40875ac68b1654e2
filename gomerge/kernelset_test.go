package gomerge

import (
	"errors"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/kernels"
)

// The engine reports the kernel set that package kernels chose, and a
// GOMERGE_KERNELS request it cannot honour as a ValueError with the same
// message.
func TestKernelsError(t *testing.T) {
	assert.Equal(t, kernels.InUse(), KernelSet)
	assert.Equal(t, kernels.Runnable(), RunnableKernels())
	if kernels.Err() == nil {
		assert.NoError(t, KernelsError())
	} else {
		assert.Equal(t, KindValue, KindOf(KernelsError()))
		assert.Equal(t, kernels.Err().Error(), KernelsError().Error())
	}
	for _, tc := range []struct {
		name string
		err  error
	}{
		{"none", nil},
		{"refused", errors.New(`GOMERGE_KERNELS="neon" is not a kernel set: choose one of go, avx2, avx512 (or auto)`)},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got := asValueErr(tc.err)
			if tc.err == nil {
				assert.NoError(t, got)
				return
			}
			require.Error(t, got)
			assert.Equal(t, KindValue, KindOf(got))
			assert.Equal(t, tc.err.Error(), got.Error())
		})
	}
}
