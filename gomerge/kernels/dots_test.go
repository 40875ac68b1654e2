package kernels

import (
	"math/rand/v2"
	"testing"
	"unsafe"

	"gonum.org/v1/gonum/blas/blas32"
)

// Dots and AxpyRows: every set this CPU runs against the portable versions,
// and the portable ones against gonum's Sdot (on 16-byte aligned rows, where
// it adds in the order Dots documents) and Saxpy called once per row.
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
				if n == 0 || uintptr(unsafe.Pointer(&y[0]))%16 == 0 {
					if got := impl.Sdot(n, xi, 1, y, 1); got != want[e] && !(got != got && want[e] != want[e]) {
						t.Fatalf("n %d entry %d: dotsGo %v, gonum's Sdot %v", n, e, want[e], got)
					}
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
			sameBits(t, wantAxpy, gotAxpy, "axpyRowsGo vs gonum's Saxpy")
			for _, k := range sets {
				if ownKernel(t, k, "dots", k.dots, dotsGo) {
					got := make([]float32, xrows*rows)
					k.dots(got, x, zs, xrows, rows, n)
					sameBits(t, want, got, k.name+" dots")
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
