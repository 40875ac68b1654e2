package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/blas/blas64"
)

// fuseInputs are a fuse's operands (rows x cols values w, coefficients
// rows x r, basis r x cols) that exercise LowRankRows' edge cases: zero
// coefficients (skipped: a -0 stays -0), NaN and Inf, and rows whose exact
// sums fall just off a midpoint of the half-precision grid of to (a value
// on the midpoint plus terms far below its last place), where the float32
// rounding must step toward the sum.
func fuseInputs(rng *rand.Rand, rows, cols, r int, to Rounding) (w []float32, coef, basis []float64) {
	w = make([]float32, rows*cols)
	coef = make([]float64, rows*r)
	basis = make([]float64, r*cols)
	// a float32 on the grid's midpoint: 1 + half a unit of the dtype's last place, scaled
	midpoint := func() float32 {
		half := 0x1p-8 // BF16: 7 stored bits
		if to == RoundF16 {
			half = 0x1p-11 // F16: 10 stored bits
		}
		e := rng.IntN(20) - 10
		if to == RoundF16 && rng.IntN(4) == 0 {
			e = []int{-14, -15, -24, 15, 16}[rng.IntN(5)] // F16's smallest normal exponent and beyond its range
		}
		return float32(math.Ldexp((1+half)*float64(1-2*rng.IntN(2)), e))
	}
	for i := range rows {
		nearMid := i%3 == 1
		for j := range cols {
			switch x := rng.IntN(60); {
			case nearMid:
				w[i*cols+j] = midpoint()
			case x == 0:
				w[i*cols+j] = float32(math.Copysign(0, -1))
			case x == 1:
				w[i*cols+j] = []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))}[rng.IntN(3)]
			default:
				w[i*cols+j] = float32(rng.NormFloat64())
			}
		}
		for k := range r {
			switch {
			case rng.IntN(5) == 0:
				coef[i*r+k] = 0
			case nearMid:
				coef[i*r+k] = rng.NormFloat64() * 0x1p-40 // far below the midpoint's last place, of either sign
			default:
				coef[i*r+k] = float64(float32(rng.NormFloat64())) * float64(float32(rng.NormFloat64()))
			}
		}
	}
	for j := range basis {
		basis[j] = float64(float32(rng.NormFloat64()))
		if rng.IntN(2000) == 0 {
			basis[j] = math.Inf(1)
		}
	}
	return w, coef, basis
}

// lowRankReference is LowRankRows one element at a time: each product
// rounded (an explicit conversion, which forbids a fused multiply-add),
// added in order of k, zero coefficients skipped, then ToFloat32For.
func lowRankReference(w []float32, coef, basis []float64, rows, cols, r int, to Rounding) []float32 {
	out := make([]float32, len(w))
	for i := range rows {
		for j := range cols {
			acc := float64(w[i*cols+j])
			for k := range r {
				if c := coef[i*r+k]; c != 0 {
					acc += float64(c * basis[k*cols+j])
				}
			}
			out[i*cols+j] = ToFloat32For(acc, to)
		}
	}
	return out
}

// LowRankRows: the portable kernel against the element-wise reference and
// (where the compiler fuses no multiply-add) against the path that fuse
// took before the kernels, gonum's Daxpy per term; every set this CPU runs
// against the portable kernel, bit for bit, on widths around every vector
// block and chunk of columns.
func TestLowRankRowsKernels(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(19, 2))
	impl := blas64.Implementation()
	for _, to := range []Rounding{RoundF32, RoundBF16, RoundF16} {
		nudged := 0
		for _, c := range []struct{ rows, cols, r int }{
			{0, 5, 3}, {3, 0, 2}, {4, 7, 0}, {5, 1, 1}, {6, 15, 2}, {7, 16, 16}, {3, 17, 3}, {9, 31, 4},
			{4, 32, 8}, {5, 33, 5}, {6, 64, 16}, {3, 100, 7}, {4, 129, 130}, {5, 700, 16}, {2, 2049, 1}, {3, 1000, 64},
		} {
			name := fmt.Sprintf("to %d, %d x %d, rank %d", to, c.rows, c.cols, c.r)
			w, coef, basis := fuseInputs(rng, c.rows, c.cols, c.r, to)
			want := lowRankReference(w, coef, basis, c.rows, c.cols, c.r, to)
			for j, v := range want {
				exact := float64(w[j])
				if v != v || exact != exact {
					continue
				}
				if math.Float32bits(v) != math.Float32bits(float32(lowRankSum(w, coef, basis, c.cols, c.r, j))) {
					nudged++
				}
			}
			if !fusedMultiplyAdd {
				gonum := append([]float32(nil), w...)
				acc := make([]float64, c.cols)
				for i := range c.rows {
					for j := range acc {
						acc[j] = float64(gonum[i*c.cols+j])
					}
					for k := range c.r {
						impl.Daxpy(c.cols, coef[i*c.r+k], basis[k*c.cols:(k+1)*c.cols], 1, acc, 1)
					}
					for j, v := range acc {
						gonum[i*c.cols+j] = ToFloat32For(v, to)
					}
				}
				sameBits(t, gonum, want, name+": reference vs gonum's Daxpy")
			}
			got := append([]float32(nil), w...)
			lowRankRowsGo(got, coef, basis, c.rows, c.cols, c.r, to)
			sameBits(t, want, got, name+": lowRankRowsGo")
			for _, k := range sets {
				if ownKernel(t, k, "lowRankRows", k.lowRankRows, lowRankRowsGo) {
					got := append([]float32(nil), w...)
					k.lowRankRows(got, coef, basis, c.rows, c.cols, c.r, to)
					sameBits(t, want, got, name+": "+k.name+" lowRankRows")
				}
			}
		}
		if to != RoundF32 {
			require.Positive(t, nudged, "to %d: no sum fell next to a midpoint: the inputs miss the nudge", to)
		}
	}
}

// lowRankSum is the float64 sum of LowRankRows for element e of w.
func lowRankSum(w []float32, coef, basis []float64, cols, r, e int) float64 {
	i, j := e/cols, e%cols
	acc := float64(w[e])
	for k := range r {
		if c := coef[i*r+k]; c != 0 {
			acc += float64(c * basis[k*cols+j])
		}
	}
	return acc
}

// ToFloat32For: the float32 value, rounded to the dtype by the portable
// encoder, is the float64 value rounded to the dtype directly.
func TestToFloat32ForRoundsOnce(t *testing.T) {
	for _, c := range []struct {
		v    float64
		to   Rounding
		want uint16
	}{
		{1 + 0x1p-8 + 0x1p-40, RoundBF16, 0x3f81}, // above BF16's midpoint: up (a float32 rounding alone ties to even, down)
		{1 + 0x1p-8 - 0x1p-40, RoundBF16, 0x3f80},
		{-(1 + 0x1p-8 + 0x1p-40), RoundBF16, 0xbf81},
		{1 + 0x1p-11 + 0x1p-40, RoundF16, 0x3c01},
		{1 + 0x1p-11 - 0x1p-40, RoundF16, 0x3c00},
		{1 + 3*0x1p-11 - 0x1p-40, RoundF16, 0x3c01}, // below an odd midpoint: down (ties to even would go up)
	} {
		f := ToFloat32For(c.v, c.to)
		var h [1]uint16
		encodeHalfGo(h[:], []float32{f}, c.to == RoundBF16)
		require.Equal(t, c.want, h[0], "%v to %d", c.v, c.to)
	}
	require.Equal(t, float32(1.5), ToFloat32For(1.5, RoundF32))
	require.True(t, math.IsNaN(float64(ToFloat32For(math.NaN(), RoundBF16))))
}

func BenchmarkLowRankRows(b *testing.B) {
	rows, cols, r := 256, 2048, 16
	rng := rand.New(rand.NewPCG(1, 2))
	w, coef, basis := make([]float32, rows*cols), make([]float64, rows*r), make([]float64, r*cols)
	for j := range w {
		w[j] = float32(rng.NormFloat64())
	}
	for j := range coef {
		coef[j] = rng.NormFloat64() * 1e-3
	}
	for j := range basis {
		basis[j] = rng.NormFloat64() * 1e-3
	}
	for _, k := range kernelSets {
		if len(k.missing()) > 0 {
			continue
		}
		b.Run(k.name, func(b *testing.B) {
			b.SetBytes(int64(4 * rows * cols))
			for b.Loop() {
				k.lowRankRows(w, coef, basis, rows, cols, r, RoundBF16)
			}
			b.ReportMetric(float64(b.N)*float64(rows*cols*r)/b.Elapsed().Seconds()/1e9, "Gmuladd/s")
		})
	}
	b.Run("gonum", func(b *testing.B) {
		impl := blas64.Implementation()
		acc := make([]float64, cols)
		for b.Loop() {
			for i := range rows {
				for j := range acc {
					acc[j] = float64(w[i*cols+j])
				}
				for k := range r {
					if c := coef[i*r+k]; c != 0 {
						impl.Daxpy(cols, c, basis[k*cols:(k+1)*cols], 1, acc, 1)
					}
				}
				for j, v := range acc {
					w[i*cols+j] = ToFloat32For(v, RoundBF16)
				}
			}
		}
		b.ReportMetric(float64(b.N)*float64(rows*cols*r)/b.Elapsed().Seconds()/1e9, "Gmuladd/s")
	})
}
