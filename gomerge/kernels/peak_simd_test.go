//go:build goexperiment.simd && amd64

package kernels

import (
	"testing"

	"github.com/stretchr/testify/require"
)

// The assembly peak loops compute what they claim: peakChains chains of
// c = c*a + a from 0 (a = 2^-10: c*a is exact, so each step is one float
// addition here too), summed lane by lane, for each set this CPU runs.
func TestPeakLoopsCompute(t *testing.T) {
	const a = 1.0 / 1024
	for _, k := range runnableSets(t) {
		if k.name == "go" {
			continue
		}
		for _, iters := range []int{0, 1, 7, 1000} {
			var c32 float32
			var c64 float64
			for range iters {
				c32 = c32*a + a
				c64 = c64*a + a
			}
			s32, s64 := c32, c64
			for range peakChains - 1 {
				s32 += c32
				s64 += c64
			}
			loops := peakLoops[k.name]
			flops, sink := loops[0](iters)
			require.Equal(t, float64(s32), sink, "%s float32, %d steps", k.name, iters)
			require.Equal(t, 2*peakChains*float64(vectorLanes(k.name, 4)*iters), flops)
			flops, sink = loops[1](iters)
			require.Equal(t, s64, sink, "%s float64, %d steps", k.name, iters)
			require.Equal(t, 2*peakChains*float64(vectorLanes(k.name, 8)*iters), flops)
		}
	}
}

// vectorLanes is the values of size bytes in a vector of the set.
func vectorLanes(set string, size int) int {
	if set == "avx512" {
		return 64 / size
	}
	return 32 / size
}
