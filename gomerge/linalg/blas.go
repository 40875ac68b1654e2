package linalg

import (
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/blas/gonum"

	"gomerge/gomerge/kernels"
)

// fastBLAS is gonum's BLAS with the large float64 matrix products on
// kernels.Gemm64 (blocked, vectorised, on all cores). gonum's LAPACK (the
// thin QRs of LowRankSVD, the span methods and the randomized SVD, and
// the small SVDs) calls blas64's implementation, so its blocked
// Householder updates run on it too. Products below fastGemmMin
// multiply-adds stay on gonum's Dgemm, bit for bit as before (every shape
// of the golden corpus, tests/golden): the choice depends on the shape
// and the kernel set only (blockedProducts: never on the portable set).
type fastBLAS struct{ gonum.Implementation }

// fastGemmMin is the smallest product (m n k multiply-adds) that fastBLAS
// computes with kernels.Gemm64.
const fastGemmMin = 1 << 22

func init() { blas64.Use(fastBLAS{}) }

// Dgemm computes C = alpha op(A) op(B) + beta C: op(A) op(B) by
// kernels.Gemm64 (each entry one chain of fused multiply-adds in order),
// then scaled and added to beta C.
func (f fastBLAS) Dgemm(tA, tB blas.Transpose, m, n, k int, alpha float64, a []float64, lda int, b []float64, ldb int, beta float64, c []float64, ldc int) {
	if m*n*k < fastGemmMin || alpha == 0 || !blockedProducts() {
		f.Implementation.Dgemm(tA, tB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc)
		return
	}
	ta, tb := tA != blas.NoTrans, tB != blas.NoTrans
	ar, ac := m, k
	if ta {
		ar, ac = k, m
	}
	br, bc := k, n
	if tb {
		br, bc = n, k
	}
	if lda < max(1, ac) || ldb < max(1, bc) || ldc < max(1, n) ||
		len(a) < (ar-1)*lda+ac || len(b) < (br-1)*ldb+bc || len(c) < (m-1)*ldc+n {
		f.Implementation.Dgemm(tA, tB, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc) // gonum's checks and panics
		return
	}
	am := kernels.Matrix64{Rows: m, Cols: k, Stride: lda, Trans: ta, Data: a}
	bm := kernels.Matrix64{Rows: k, Cols: n, Stride: ldb, Trans: tb, Data: b}
	if alpha == 1 && beta == 0 {
		// C = op(A) op(B): the product written in place (1 v is v; C is not read)
		gemm64(am, bm, c, ldc)
		return
	}
	tp := scratch64(m * n)
	defer scratchPool64.Put(tp)
	t := (*tp)[:m*n]
	gemm64(am, bm, t, n)
	for i := range m {
		row, out := t[i*n:(i+1)*n], c[i*ldc:i*ldc+n]
		switch {
		case beta == 0: // C is not read (BLAS)
			for j, v := range row {
				out[j] = alpha * v
			}
		case alpha == 1 && beta == 1:
			for j, v := range row {
				out[j] += v
			}
		case alpha == -1 && beta == 1: // Dlarfb's C - V W^T: (-v) + c is c - v
			for j, v := range row {
				out[j] -= v
			}
		default:
			for j, v := range row {
				out[j] = float64(alpha*v) + float64(beta*out[j])
			}
		}
	}
}

// gemm64 is kernels.Gemm64 on shapes that fastBLAS.Dgemm has checked.
func gemm64(a, b kernels.Matrix64, c []float64, ldc int) {
	if err := kernels.Gemm64(a, b, c, ldc); err != nil {
		panic("gomerge: " + err.Error())
	}
}

// scratchPool64 recycles the products that fastBLAS.Dgemm adds to C (the
// blocked QRs' trailing updates: megabytes per panel, which fresh
// allocations would clear each time).
var scratchPool64 sync.Pool

// scratch64 returns a buffer of at least n float64 values with undefined
// contents, from scratchPool64 when one there is large enough.
func scratch64(n int) *[]float64 {
	if p, ok := scratchPool64.Get().(*[]float64); ok {
		if cap(*p) >= n {
			return p
		}
	}
	b := make([]float64, n)
	return &b
}
