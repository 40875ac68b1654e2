package kernels

import (
	"math/rand/v2"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
)

func TestPruneKTruncatesLikePython(t *testing.T) {
	assert.Equal(t, 2, PruneK(0.3, 7))     // 2.1
	assert.Equal(t, 0, PruneK(0.1, 9))     // 0.9
	assert.Equal(t, 28, PruneK(0.29, 100)) // 0.29 * 100 = 28.999999999999996: Python int() gives 28
}

func TestSelectKthLargest(t *testing.T) {
	rng := rand.New(rand.NewPCG(2, 2))
	for n := 1; n < 200; n += 7 {
		x := make([]uint32, n)
		for i := range x {
			x[i] = uint32(rng.IntN(50))
		}
		sorted := append([]uint32(nil), x...)
		sort.Slice(sorted, func(a, b int) bool { return sorted[a] > sorted[b] })
		for k := 1; k <= n; k++ {
			assert.Equal(t, sorted[k-1], selectKthLargest(append([]uint32(nil), x...), k))
		}
	}
}
