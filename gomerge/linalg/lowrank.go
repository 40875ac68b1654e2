package linalg

import (
	"math"
	"sync"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"
)

// LowRankSVD computes the rank-k truncated SVD of the product B @ A, where
// B is m x R and A is R x n (row-major float64; b is overwritten), without
// forming the m x n product: thin QRs B = Qb Rb and A^T = Qa Ra, an SVD of the small core
// Rb Ra^T = U S V^T, then B @ A = (Qb U) S (Qa V)^T. The cost is
// O((m + n) R^2 + R^3) instead of a dense O(m n min(m, n)) SVD.
//
// It returns Bk = (Qb U)[:, :k] diag(S[:k]) (m x k), Ak = (Qa V)[:, :k]^T
// (k x n) and the singular values. All singular values go into Bk and Ak has
// orthonormal rows, as in PEFT. Components beyond the rank of the product
// are zero. Signs are canonical: the largest-magnitude entry of each left
// singular vector is positive.
func LowRankSVD(b []float64, a []float64, m, r, n, k int) (bk, ak, s []float64) {
	bk, ak, s, _ = LowRankSVDBy(b, a, m, r, n, func([]float64) int { return k })
	return bk, ak, s
}

// LowRankSVDBy is LowRankSVD with the rank chosen from the singular values
// (all min(m, n, R) of them, decreasing) by rank; it returns that rank too.
func LowRankSVDBy(b []float64, a []float64, m, r, n int, rank func(s []float64) int) (bk, ak, s []float64, k int) {
	var qb, rb []float64
	var pb int
	qrB := func() { qb, rb, pb = ThinQR(b, m, r) }
	var wg sync.WaitGroup
	if (m+n)*r*r >= concurrentQRMin {
		// the two QRs are independent, and most of their time goes to gonum's unblocked panels on one core
		wg.Go(qrB)
	} else {
		qrB()
	}
	at := transpose(a, r, n)
	qa, ra, pa := ThinQR(at, n, r)
	wg.Wait()

	// core = Rb (pb x r) @ Ra^T (r x pa)
	core := make([]float64, pb*pa)
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: pb, Cols: r, Stride: r, Data: rb},
		blas64.General{Rows: pa, Cols: r, Stride: r, Data: ra},
		0, blas64.General{Rows: pb, Cols: pa, Stride: pa, Data: core})
	sv, vtc := smallSVD(core, pb, pa)
	q := len(sv)
	k = rank(sv)
	kk := min(k, q)

	bk = make([]float64, m*k)
	ak = make([]float64, k*n)
	if kk == 0 {
		return bk, ak, sv, k
	}
	// The left vectors scaled by the singular values, Uc[:, :kk] diag(S[:kk]), are core @ V[:, :kk]: the
	// SVD need not accumulate Uc (half its rotations).
	cv := make([]float64, pb*kk)
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: pb, Cols: pa, Stride: pa, Data: core},
		blas64.General{Rows: kk, Cols: pa, Stride: pa, Data: vtc},
		0, blas64.General{Rows: pb, Cols: kk, Stride: kk, Data: cv})
	// left = Qb (m x pb) @ cv (pb x kk), written into bk with stride k
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1,
		blas64.General{Rows: m, Cols: pb, Stride: pb, Data: qb},
		blas64.General{Rows: pb, Cols: kk, Stride: kk, Data: cv},
		0, blas64.General{Rows: m, Cols: kk, Stride: k, Data: bk})
	// right^T = Vt[:kk, :] (kk x pa) @ Qa^T (pa x n)
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: kk, Cols: pa, Stride: pa, Data: vtc},
		blas64.General{Rows: n, Cols: pa, Stride: pa, Data: qa},
		0, blas64.General{Rows: kk, Cols: n, Stride: n, Data: ak})
	for j := 0; j < kk; j++ {
		// canonical sign: largest |entry| of the left vector positive
		best, sign := 0.0, 1.0
		for i := 0; i < m; i++ {
			if v := math.Abs(bk[i*k+j]); v > best {
				best, sign = v, math.Copysign(1, bk[i*k+j])
			}
		}
		if sign < 0 {
			for i := 0; i < m; i++ {
				bk[i*k+j] = -bk[i*k+j]
			}
			for i := j * n; i < (j+1)*n; i++ {
				ak[i] = -ak[i]
			}
		}
	}
	return bk, ak, sv, k
}

// concurrentQRMin is the size ((m + n) R^2) from which LowRankSVDBy runs
// its two thin QRs at once (each one is computed as alone: the same bits).
const concurrentQRMin = 1 << 22

// ThinQR factors the m x r row-major matrix x (overwritten) as Q R with Q
// m x p orthonormal and R p x r upper triangular, p = min(m, r).
func ThinQR(x []float64, m, r int) (q, rf []float64, p int) {
	p = min(m, r)
	g := blas64.General{Rows: m, Cols: r, Stride: r, Data: x}
	tau := make([]float64, p)
	work := []float64{0}
	lapack64.Geqrf(g, tau, work, -1)
	work = make([]float64, int(work[0]))
	lapack64.Geqrf(g, tau, work, len(work))
	rf = make([]float64, p*r)
	for i := 0; i < p; i++ {
		copy(rf[i*r+i:(i+1)*r], x[i*r+i:(i+1)*r])
	}
	q = make([]float64, m*p)
	for i := 0; i < m; i++ {
		copy(q[i*p:(i+1)*p], x[i*r:i*r+p])
	}
	qg := blas64.General{Rows: m, Cols: p, Stride: p, Data: q}
	work = []float64{0}
	lapack64.Orgqr(qg, tau, work, -1)
	work = make([]float64, max(1, int(work[0])))
	lapack64.Orgqr(qg, tau, work, len(work))
	return q, rf, p
}

// smallSVD is the thin SVD of a small m x n matrix without its left
// vectors: S (q) and Vt (q x n), q = min(m, n).
func smallSVD(x []float64, m, n int) (s, vt []float64) {
	q := min(m, n)
	if q == 0 {
		return nil, nil
	}
	a := blas64.General{Rows: m, Cols: n, Stride: n, Data: append([]float64(nil), x...)}
	s = make([]float64, q)
	ug := blas64.General{Rows: 1, Cols: 1, Stride: 1, Data: make([]float64, 1)}
	vg := blas64.General{Rows: q, Cols: n, Stride: n, Data: make([]float64, q*n)}
	work := []float64{0}
	lapack64.Gesvd(lapack.SVDNone, lapack.SVDStore, a, ug, vg, s, work, -1)
	work = make([]float64, int(work[0]))
	if ok := lapack64.Gesvd(lapack.SVDNone, lapack.SVDStore, a, ug, vg, s, work, len(work)); !ok {
		panic("gomerge: SVD of the core matrix did not converge")
	}
	return s, vg.Data
}

func transpose(x []float64, rows, cols int) []float64 {
	t := make([]float64, len(x))
	for i := 0; i < rows; i++ {
		for j := 0; j < cols; j++ {
			t[j*rows+i] = x[i*cols+j]
		}
	}
	return t
}
