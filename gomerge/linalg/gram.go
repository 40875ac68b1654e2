package linalg

import (
	"math"
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/blas/gonum"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"
)

// gramMin is the size ((m + n) R^2) from which LowRankSVDBy tries the Gram
// route (lowRankSVDGram) below implicitQMin, on stacks thin enough
// (gramThin R <= min(m, n)). Every shape of the golden corpus
// (tests/golden: hidden sizes up to 256, stacked ranks up to 28, and the
// exact SVDs of RandomizedSVD, whose stack is as wide as the short side)
// stays below it or is too wide, so it keeps the Householder QRs bit for
// bit. S1's TinyLlama modules (m + n >= 2304, R = 24) are above it.
const (
	gramMin  = 1 << 20
	gramThin = 4
)

// gramKappaMax bounds the condition number of the column-equilibrated
// Cholesky factors that the Gram route accepts. Forming B^T B squares the
// condition number: the implicit Q = B Rb^{-1} loses orthogonality by about
// c kappa^2 u (u = 2^-53, c a small multiple of R), and the singular values
// and factors inherit that relative error. Cholesky is invariant under
// column scaling up to rounding (Demmel), so kappa is that of Rb with unit
// columns, which does not count the adapters' weights and scalings. At
// kappa <= 1e3 the error is about 1e-10 relative, some 500 times below
// float32's half ulp (6e-8): the svd merge's float32 outputs are the bits
// they would be from the Householder route up to that margin. The estimate
// is gonum's Dtrcon (1-norm, within a small factor of the 2-norm condition
// number for R of a few dozen). Beyond the bound, or where Cholesky fails
// (a rank-deficient stack: identical or zero adapters), LowRankSVDBy takes
// the Householder QRs.
const gramKappaMax = 1e3

// gramChunk is the number of columns of x per Dsyrk in gramFactor: R rows
// of it (48 KiB at R = 24) stay in the L2 cache.
const gramChunk = 256

// useGram says whether LowRankSVDBy tries the Gram route on this shape.
func useGram(m, r, n int) bool {
	return (m+n)*r*r >= gramMin && gramThin*r <= min(m, n)
}

// lowRankSVDGram is LowRankSVDBy by Cholesky factors of the Gram matrices:
// B^T B = Rb^T Rb and A A^T = Ra^T Ra give B = Qb Rb and A^T = Qa Ra with
// Qb = B Rb^{-1} and Qa = A^T Ra^{-1} never formed. The core Rb Ra^T =
// U S V^T is factored as in LowRankSVDBy, and the outputs are
// Bk = B (Rb^{-1} U S) and Ak = (V^T Ra^{-T}) A: two triangular solves on
// R x k matrices and one product each with B and A. The cost is about
// (m + n) R (R + 2k) flops against the QRs' 8 (m + n) R^2. It reports
// ok = false, with b and a untouched, where a Cholesky fails or a factor's
// conditioning exceeds gramKappaMax.
//
// All its products are gonum's (Dsyrk, Dgemm) on rows of B^T and A, so the
// same bits on every kernel set: at these shapes (R and k a few dozen at
// most) kernels.Gemm64's packing buffers cost more than the arithmetic, and
// gonum's dot products over contiguous rows run at its speed. The two
// sides run at once.
func lowRankSVDGram(b, a []float64, m, r, n int, rank func(s []float64) int) (bk, ak, s []float64, k int, ok bool) {
	btp := scratch64(r * m) // B^T, r x m: rows that Dsyrk and Dgemm read contiguously
	defer scratchPool64.Put(btp)
	bt := (*btp)[:r*m]
	var rb, ra []float64
	var okB, okA bool
	var wg sync.WaitGroup
	wg.Go(func() {
		transposeTiled(b, m, r, bt)
		rb, okB = gramFactor(bt, r, m)
	})
	ra, okA = gramFactor(a, r, n)
	wg.Wait()
	if !okB || !okA {
		return nil, nil, nil, 0, false
	}
	core, sv, vtc, k, kk := coreSVD(rb, ra, r, r, r, rank)
	bk = make([]float64, m*k)
	ak = make([]float64, k*n)
	if kk == 0 {
		return bk, ak, sv, k, true
	}
	var impl gonum.Implementation
	wg.Go(func() {
		// x^T = (Rb^{-1} core V[:, :kk])^T = Vt[:kk, :] core^T Rb^{-T} (kk x r), then Bk^T = x^T B^T (kk x m)
		xt := make([]float64, kk*r)
		impl.Dgemm(blas.NoTrans, blas.Trans, kk, r, r, 1, vtc, r, core, r, 0, xt, r)
		impl.Dtrsm(blas.Right, blas.Upper, blas.Trans, blas.NonUnit, kk, r, 1, rb, r, xt, r)
		bktp := scratch64(kk * m)
		defer scratchPool64.Put(bktp)
		bkt := (*bktp)[:kk*m]
		impl.Dgemm(blas.NoTrans, blas.NoTrans, kk, m, r, 1, xt, r, bt, m, 0, bkt, m)
		for j := 0; j < kk; j++ {
			for i, v := range bkt[j*m : (j+1)*m] {
				bk[i*k+j] = v
			}
		}
	})
	// y = Vt[:kk, :] Ra^{-T} (kk x r), then Ak = y A (kk x n)
	y := append([]float64(nil), vtc[:kk*r]...)
	impl.Dtrsm(blas.Right, blas.Upper, blas.Trans, blas.NonUnit, kk, r, 1, ra, r, y, r)
	impl.Dgemm(blas.NoTrans, blas.NoTrans, kk, n, r, 1, y, r, a, n, 0, ak, n)
	wg.Wait()
	canonicalSigns(bk, ak, m, n, k, kk)
	return bk, ak, sv, k, true
}

// gramFactor returns the upper triangular Cholesky factor R (r x r) of
// x x^T for x (r x cols, row-major), and whether the route may use it: the
// Cholesky succeeded and R with unit columns has a condition number of at
// most gramKappaMax (estimated).
func gramFactor(x []float64, r, cols int) (rf []float64, ok bool) {
	rf = make([]float64, r*r)
	// x x^T summed over chunks of gramChunk columns: Dsyrk's dot products then read the r rows from the L2 cache
	// (whole rows of thousands of values would stream from memory once per pair of rows)
	for c0 := 0; c0 < cols; c0 += gramChunk {
		beta := 1.0
		if c0 == 0 {
			beta = 0
		}
		gonum.Implementation{}.Dsyrk(blas.Upper, blas.NoTrans, r, min(gramChunk, cols-c0), 1, x[c0:], cols, beta, rf, r)
	}
	for i := 0; i < r; i++ {
		if !(rf[i*r+i] > 0) || math.IsInf(rf[i*r+i], 0) {
			return nil, false // a zero row (a zero adapter), or NaN or Inf
		}
	}
	if _, chol := lapack64.Potrf(blas64.Symmetric{Uplo: blas.Upper, N: r, Stride: r, Data: rf}); !chol {
		return nil, false
	}
	// R D^{-1}, D the norms of R's columns (those of x's rows): the equilibrated factor
	eq := make([]float64, r*r)
	for j := 0; j < r; j++ {
		nrm := 0.0
		for i := 0; i <= j; i++ {
			nrm += rf[i*r+j] * rf[i*r+j]
		}
		nrm = math.Sqrt(nrm) // no overflow: the Gram matrix's diagonal (this squared) is finite
		for i := 0; i <= j; i++ {
			eq[i*r+j] = rf[i*r+j] / nrm
		}
	}
	rcond := lapack64.Trcon(lapack.MaxColumnSum, blas64.Triangular{Uplo: blas.Upper, Diag: blas.NonUnit, N: r, Stride: r, Data: eq},
		make([]float64, 3*r), make([]int, r))
	return rf, rcond*gramKappaMax >= 1
}

// transposeTiled writes the transpose of x (rows x cols) into t (cols x
// rows), a tile of rows at a time: writing along whole columns of t would
// hit one cache set per row where rows is a power of two.
func transposeTiled(x []float64, rows, cols int, t []float64) {
	const tile = 16
	for i0 := 0; i0 < rows; i0 += tile {
		i1 := min(i0+tile, rows)
		for j := 0; j < cols; j++ {
			dst := t[j*rows+i0 : j*rows+i1]
			for i := range dst {
				dst[i] = x[(i0+i)*cols+j]
			}
		}
	}
}
