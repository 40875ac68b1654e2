package kernels

import (
	"cmp"
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/require"

	"gonum.org/v1/gonum/blas/blas32"
)

// Dots and AxpyRows: every set this CPU runs against the portable versions,
// and the portable ones against gonum's Sdot and Saxpy called once per row
// (rows of every alignment: n is odd in some cases).
func TestDotKernels(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(3, 5))
	impl := blas32.Implementation()
	for _, n := range []int{0, 1, 3, 4, 7, 8, 15, 16, 17, 31, 32, 100, 4096, 4101} {
		for _, rows := range []int{0, 1, 3, 8, 9, 17, 26} {
			xrows := []int{0, 1, 4, 7, 9}[rows%5]
			x := kernelInputs(rng, 1, xrows*n, true)[0]
			zs := kernelInputs(rng, 1, rows*n, true)[0]
			want := make([]float32, xrows*rows)
			dotsGo(want, x, zs, xrows, rows, n)
			for e := range want {
				xi, y := x[e/rows*n:(e/rows+1)*n], zs[e%rows*n:(e%rows+1)*n]
				sdot := impl.Sdot(n, xi, 1, y, 1)
				if !fusedMultiplyAdd {
					sameBits(t, []float32{sdot}, want[e:e+1], "dotsGo vs gonum's Sdot")
					continue
				}
				// gonum's Go Sdot adds in another order (and may fuse): within n roundings of sum |x y|
				bound := 0.0
				for i := range xi {
					bound += math.Abs(float64(xi[i]) * float64(y[i]))
				}
				if d := math.Abs(float64(sdot) - float64(want[e])); d > float64(n+1)*bound*0x1p-23 && sdot == sdot {
					t.Fatalf("n %d entry %d: dotsGo %v, gonum's Sdot %v", n, e, want[e], sdot)
				}
			}
			a := kernelInputs(rng, 1, rows, true)[0]
			xs := make([][]float32, rows)
			for r := range xs {
				xs[r] = zs[r*n : (r+1)*n]
			}
			dst := kernelInputs(rng, 1, n, true)[0]
			wantAxpy := append([]float32(nil), dst...)
			for r := range xs {
				impl.Saxpy(n, a[r], xs[r], 1, wantAxpy, 1)
			}
			gotAxpy := append([]float32(nil), dst...)
			axpyRowsGo(gotAxpy, a, xs)
			sameAsReference(t, wantAxpy, gotAxpy, "axpyRowsGo vs gonum's Saxpy")
			s := []float32{0.37, 0, -2}[rows%3]
			wantDense := make([]float32, n)
			for r := range xs {
				impl.Saxpy(n, a[r], xs[r], 1, wantDense, 1)
			}
			impl.Sscal(n, s, wantDense, 1)
			gotDense := append([]float32(nil), dst...)
			denseRowGo(gotDense, a, xs, s)
			sameAsReference(t, wantDense, gotDense, "denseRowGo vs gonum's Saxpy and Sscal")
			for _, k := range sets {
				if ownKernel(t, k, "dots", k.dots, dotsGo) {
					got := make([]float32, xrows*rows)
					k.dots(got, x, zs, xrows, rows, n)
					sameBits(t, want, got, k.name+" dots")
				}
				if ownKernel(t, k, "denseRow", k.denseRow, denseRowGo) {
					got := append([]float32(nil), dst...)
					k.denseRow(got, a, xs, s)
					sameBits(t, wantDense, got, k.name+" denseRow")
				}
				if ownKernel(t, k, "axpyRows", k.axpyRows, axpyRowsGo) {
					got := append([]float32(nil), dst...)
					k.axpyRows(got, a, xs)
					sameBits(t, wantAxpy, got, k.name+" axpyRows")
				}
			}
		}
	}
}

// MagnitudeRank: the portable version against a stable sort's positions,
// every set this CPU runs against the portable version.
func TestMagnitudeRank(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(4, 4))
	for _, n := range []int{1, 5, 8, 9, 31, 100, 1029} {
		mag := make([]uint32, n)
		for i := range mag {
			switch rng.IntN(3) {
			case 0:
				mag[i] = uint32(rng.IntN(3)) // ties
			case 1:
				mag[i] = 0x7fffffff - uint32(rng.IntN(2))
			default:
				mag[i] = rng.Uint32() & 0x7fffffff
			}
		}
		idx := make([]int, n)
		for i := range idx {
			idx[i] = i
		}
		slices.SortStableFunc(idx, func(a, b int) int { return cmp.Compare(mag[a], mag[b]) })
		for rank, c := range idx {
			require.Equal(t, rank, magnitudeRankGo(mag, c), "n %d entry %d", n, c)
			for _, k := range sets {
				if ownKernel(t, k, "magnitudeRank", k.magnitudeRank, magnitudeRankGo) {
					require.Equal(t, rank, k.magnitudeRank(mag, c), "%s n %d entry %d", k.name, n, c)
				}
			}
		}
	}
}

// MulTInto: the portable version against gonum's Saxpy once per row of D
// and row of part, every set this CPU runs against the portable version.
func TestMulTInto(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(6, 6))
	impl := blas32.Implementation()
	for _, n := range []int{1, 15, 16, 17, 40, 1000} {
		for _, l := range []int{1, 3, 4, 5, 26} {
			rows := 1 + rng.IntN(40)
			d := kernelInputs(rng, 1, rows*n, true)[0]
			y := make([]float32, rows*l)
			for i := range y {
				y[i] = float32(rng.NormFloat64()) // no zeros
			}
			part := kernelInputs(rng, 1, l*n, true)[0]
			want := append([]float32(nil), part...)
			for i := range rows {
				for c := range l {
					impl.Saxpy(n, y[i*l+c], d[i*n:(i+1)*n], 1, want[c*n:(c+1)*n], 1)
				}
			}
			got := append([]float32(nil), part...)
			mulTIntoGo(got, d, y, rows, n, l)
			sameAsReference(t, want, got, "mulTIntoGo vs gonum's Saxpy")
			for _, k := range sets {
				if ownKernel(t, k, "mulTInto", k.mulTInto, mulTIntoGo) {
					got := append([]float32(nil), part...)
					k.mulTInto(got, d, y, rows, n, l)
					sameBits(t, want, got, k.name+" mulTInto")
				}
			}
		}
	}
}
