package methods

import (
	"math"
	"math/rand/v2"
	"slices"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/kernels"
)

// pruneBySort is the reference: keep the k largest magnitudes (stable order
// among equal magnitudes: the first ones in memory are kept).
func pruneBySort(t []float32, density float64) []float32 {
	k := kernels.PruneK(density, len(t))
	idx := make([]int, len(t))
	for i := range idx {
		idx[i] = i
	}
	sort.SliceStable(idx, func(a, b int) bool { return abs32(t[idx[a]]) > abs32(t[idx[b]]) })
	out := make([]float32, len(t))
	for _, i := range idx[:min(k, len(t))] {
		out[i] = t[i]
	}
	return out
}

func abs32(v float32) float32 { return float32(math.Abs(float64(v))) }

func TestMagnitudePrune(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 1))
	gen := map[string]func(n int) []float32{
		"normal": func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.NormFloat64())
			}
			return x
		},
		"many ties": func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(rng.IntN(5) - 2)
			}
			return x
		},
		"tiny and huge": func(n int) []float32 {
			x := make([]float32, n)
			for i := range x {
				x[i] = float32(math.Ldexp(rng.Float64()-0.5, rng.IntN(200)-100))
			}
			return x
		},
	}
	for name, g := range gen {
		for _, n := range []int{1, 7, 100, 4096, 100_000} {
			for _, density := range []float64{0, 0.01, 0.2, 0.5, 0.999, 1} {
				x := g(n)
				want := pruneBySort(x, density)
				MagnitudePrune(x, density)
				kept := 0
				for _, v := range x {
					if v != 0 {
						kept++
					}
				}
				wantKept := 0
				for _, v := range want {
					if v != 0 {
						wantKept++
					}
				}
				require.Equal(t, wantKept, kept, "%s n=%d density=%v", name, n, density)
				if name != "many ties" { // with ties, which equal entries survive is arbitrary (as in torch)
					require.Equal(t, want, x, "%s n=%d density=%v", name, n, density)
				}
			}
		}
	}
}

func TestRandomPruneIsSeededAndRescaled(t *testing.T) {
	x := make([]float32, 100_000)
	for i := range x {
		x[i] = 3
	}
	a := append([]float32(nil), x...)
	b := append([]float32(nil), x...)
	RandomPrune(a, 0.3, true, TensorSource(5, "m", "A/0"))
	RandomPrune(b, 0.3, true, TensorSource(5, "m", "A/0"))
	assert.Equal(t, a, b)
	// the draws are TensorRNG's: a kept entry is one whose 64-bit draw is below 0.3 * 2^64
	rng, limit := TensorRNG(5, "m", "A/0"), 0.3*0x1p64
	for i, v := range a {
		require.Equal(t, rng.Uint64() < uint64(limit), v != 0, "entry %d", i)
	}
	kept := 0
	for _, v := range a {
		if v != 0 {
			kept++
			require.Equal(t, float32(3)/float32(0.3), v)
		}
	}
	assert.InDelta(t, 30_000, kept, 5*math.Sqrt(100_000*0.3*0.7))
	c := append([]float32(nil), x...)
	RandomPrune(c, 0.3, true, TensorSource(5, "m", "A/1"))
	assert.NotEqual(t, a, c, "another tensor label must give another mask")
}

func BenchmarkMagnitudePrune16M(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 1))
	x := make([]float32, 1<<24)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	y := make([]float32, len(x))
	for b.Loop() {
		copy(y, x)
		MagnitudePrune(y, 0.2)
	}
}

// MaskPrune keeps the elements of a non-zero mask byte (rescaled by
// 1/density, as a division, when asked) and writes +0 elsewhere, whatever
// the element (a negative number, an infinity, NaN).
func TestMaskPrune(t *testing.T) {
	inf, nan := float32(math.Inf(1)), float32(math.NaN())
	x := []float32{1.5, -2.25, 3, -0.7, inf, nan, -inf, 1e-30, -5}
	mask := []byte{1, 0, 2, 0, 0, 0, 255, 1, 1}
	for _, tc := range []struct {
		name    string
		density float64
		rescale bool
	}{{"rescaled", 0.3, true}, {"not rescaled", 0.3, false}, {"density 1 keeps all", 1, true}} {
		t.Run(tc.name, func(t *testing.T) {
			got := slices.Clone(x)
			MaskPrune(got, mask, tc.density, tc.rescale)
			for i, v := range x {
				want := v
				switch {
				case tc.density >= 1:
				case mask[i] == 0:
					want = 0
				case tc.rescale:
					want = v / float32(tc.density)
				}
				assert.Equal(t, math.Float32bits(want), math.Float32bits(got[i]), "element %d (%v, mask %d)", i, v, mask[i])
			}
		})
	}
}
