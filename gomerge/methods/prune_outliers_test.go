package methods

import (
	"math/rand/v2"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// outliersBySort is the reference: mergekit's magnitude_outliers with a
// stable ascending sort (equal magnitudes in index order).
func outliersBySort(t []float32, density, gamma float64) []float32 {
	out := make([]float32, len(t))
	if density >= 1 {
		copy(out, t)
		return out
	}
	nBot, targetN := OutlierCounts(len(t), density, gamma)
	idx := make([]int, len(t))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return abs32(t[idx[a]]) < abs32(t[idx[b]]) })
	for _, i := range idx[nBot : nBot+targetN] {
		out[i] = t[i]
	}
	return out
}

func TestOutlierCounts(t *testing.T) {
	for _, c := range []struct {
		n              int
		density, gamma float64
		nBot, targetN  int
	}{
		{100, 0.5, 0.01, 49, 50}, // n_top = 1
		{100, 0.5, 0.0, 50, 50},  // plain magnitude pruning
		{100, 0.9, 0.2, 0, 90},   // density + gamma > 1: fewer outliers dropped
		{10, 0.25, 0.05, 8, 2},   // int() truncates: target 2, n_top 0
		{7, 0.3, 0.3, 3, 2},      // 2.1 -> 2, 2.1 -> 2
		{1000, 0.1, 0.01, 890, 100},
		{3, 0.2, 0.5, 2, 0}, // target 0: nothing kept
		{64 * 112, 0.3, 0.05, 4660, 2150},
	} {
		nBot, targetN := OutlierCounts(c.n, c.density, c.gamma)
		assert.Equal(t, c.nBot, nBot, "%+v", c)
		assert.Equal(t, c.targetN, targetN, "%+v", c)
		assert.Equal(t, int(c.density*float64(c.n)), targetN) // Python's int(density * numel)
	}
}

func TestMagnitudeOutliers(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	gen := map[string]func(n int) []float32{
		"normal": func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			return x
		},
		"ties": func(n int) []float32 { // few distinct magnitudes, both signs: ties at both cut-offs
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.IntN(5)) * float32(1-2*rng.IntN(2))
			}
			return x
		},
		"constant": func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = -2
			}
			return x
		},
		"zeros": func(n int) []float32 { return make([]float32, n) },
	}
	for name, g := range gen {
		for _, n := range []int{1, 2, 7, 100, 5000} { // 5000: above bandMinLen, the sampled selection
			for _, c := range [][2]float64{{0.5, 0.01}, {0.2, 0.1}, {0.9, 0.2}, {0.1, 0}, {0, 0.01}, {1, 0.01}, {0.3, 1}, {0.99, 0}} {
				x := g(n)
				want := outliersBySort(x, c[0], c[1])
				MagnitudeOutliers(x, c[0], c[1])
				require.Equal(t, want, x, "%s n=%d density=%v gamma=%v", name, n, c[0], c[1])
			}
		}
	}
}

func TestMagnitudeOutliersKeepsTheMiddle(t *testing.T) {
	x := []float32{-10, 1, 2, -3, 4, 5, -6, 7, 8, 9} // |x| ascending except 10 first
	MagnitudeOutliers(x, 0.5, 0.1)                   // n_top 1 (the -10), n_bot 4 (1, 2, -3, 4)
	assert.Equal(t, []float32{0, 0, 0, 0, 0, 5, -6, 7, 8, 9}, x)
	y := []float32{3, -3, 3, 1, -3, 3}
	MagnitudeOutliers(y, 0.5, 0.2) // n_top 1, n_bot 2: ascending 1, 3, -3, 3, -3, 3: keep positions 2..4
	assert.Equal(t, []float32{0, -3, 3, 0, -3, 0}, y)
}
