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
// B is m x R and A is R x n (row-major float64; b and a are overwritten), without
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
// Large shapes take LQs with implicit Q (lowRankSVDLQ); mid-size thin
// stacks take Cholesky factors of the Gram matrices (lowRankSVDGram) where
// they are well conditioned; the rest, explicit Householder QRs.
func LowRankSVDBy(b []float64, a []float64, m, r, n int, rank func(s []float64) int) (bk, ak, s []float64, k int) {
	if min(m, r)*min(m, r)*m >= implicitQMin && min(n, r)*min(n, r)*n >= implicitQMin {
		return lowRankSVDLQ(b, a, m, r, n, rank)
	}
	if useGram(m, r, n) {
		if bk, ak, s, k, ok := lowRankSVDGram(b, a, m, r, n, rank); ok {
			return bk, ak, s, k
		}
	}
	return lowRankSVDQR(b, a, m, r, n, rank)
}

// lowRankSVDQR is LowRankSVDBy by explicit Householder QRs (the route of
// small shapes, and the fallback of the Gram route).
func lowRankSVDQR(b []float64, a []float64, m, r, n int, rank func(s []float64) int) (bk, ak, s []float64, k int) {
	var fb, fa householderQR
	var wg sync.WaitGroup
	if (m+n)*r*r >= concurrentQRMin {
		// the two QRs are independent, and most of their time goes to gonum's unblocked panels on one core
		wg.Go(func() { fb = factorQR(b, m, r) })
	} else {
		fb = factorQR(b, m, r)
	}
	at := transpose(a, r, n)
	fa = factorQR(at, n, r)
	wg.Wait()
	pb, pa := fb.p, fa.p
	core, sv, vtc, k, kk := coreSVD(fb.rFactor(), fa.rFactor(), pb, pa, r, rank)
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
	qb, qa := fb.qFactor(), fa.qFactor()
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
	canonicalSigns(bk, ak, m, n, k, kk)
	return bk, ak, sv, k
}

// coreSVD is the step every route of LowRankSVDBy shares: the core
// Rb Ra^T (pb x pa, from Rb pb x r and Ra pa x r, upper triangular), its
// singular values and V^T (smallSVD), the rank k that rank chooses, and the
// kk <= k components the core has.
func coreSVD(rb, ra []float64, pb, pa, r int, rank func(s []float64) int) (core, sv, vtc []float64, k, kk int) {
	core = make([]float64, pb*pa)
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: pb, Cols: r, Stride: r, Data: rb},
		blas64.General{Rows: pa, Cols: r, Stride: r, Data: ra},
		0, blas64.General{Rows: pb, Cols: pa, Stride: pa, Data: core})
	sv, vtc = smallSVD(core, pb, pa)
	k = rank(sv)
	return core, sv, vtc, k, min(k, len(sv))
}

// concurrentQRMin is the size ((m + n) R^2) from which LowRankSVDBy runs
// its two thin QRs at once (each one is computed as alone: the same bits).
const concurrentQRMin = 1 << 22

// ThinQR factors the m x r row-major matrix x (overwritten) as Q R with Q
// m x p orthonormal and R p x r upper triangular, p = min(m, r).
func ThinQR(x []float64, m, r int) (q, rf []float64, p int) {
	f := factorQR(x, m, r)
	return f.qFactor(), f.rFactor(), f.p
}

// householderQR is a thin QR of an m x r matrix as gonum's Dgeqrf leaves
// it: R in the upper triangle of x, Q as p = min(m, r) Householder
// reflectors below it (and their factors tau).
type householderQR struct {
	x       []float64
	m, r, p int
	tau     []float64
}

// factorQR computes the Householder QR of x (m x r, row-major,
// overwritten).
func factorQR(x []float64, m, r int) householderQR {
	f := householderQR{x: x, m: m, r: r, p: min(m, r)}
	g := blas64.General{Rows: m, Cols: r, Stride: r, Data: x}
	f.tau = make([]float64, f.p)
	work := []float64{0}
	lapack64.Geqrf(g, f.tau, work, -1)
	work = make([]float64, int(work[0]))
	lapack64.Geqrf(g, f.tau, work, len(work))
	return f
}

// rFactor returns R (p x r, upper triangular).
func (f householderQR) rFactor() []float64 {
	rf := make([]float64, f.p*f.r)
	for i := 0; i < f.p; i++ {
		copy(rf[i*f.r+i:(i+1)*f.r], f.x[i*f.r+i:(i+1)*f.r])
	}
	return rf
}

// qFactor returns the explicit Q (m x p, orthonormal columns; gonum's Dorgqr).
func (f householderQR) qFactor() []float64 {
	m, r, p := f.m, f.r, f.p
	q := make([]float64, m*p)
	for i := 0; i < m; i++ {
		copy(q[i*p:(i+1)*p], f.x[i*r:i*r+p])
	}
	qg := blas64.General{Rows: m, Cols: p, Stride: p, Data: q}
	work := []float64{0}
	lapack64.Orgqr(qg, f.tau, work, -1)
	work = make([]float64, max(1, int(work[0])))
	lapack64.Orgqr(qg, f.tau, work, len(work))
	return q
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

// implicitQMin is the size (m p^2 of both sides) from which LowRankSVDBy
// takes lowRankSVDLQ; smaller shapes (every one of the golden corpus,
// tests/golden) keep the explicit QRs, bit for bit as before.
const implicitQMin = 1 << 22

// lowRankSVDLQ is LowRankSVDBy on large shapes. gonum's LAPACK is
// row-major, so a QR's Householder vectors are strided columns, which its
// unblocked panels read one cache line (and often one page) per entry.
// Here both factors are taken as LQs of rows instead: B^T = Lb Qb' and
// A = La Qa', so Rb = Lb^T and Ra = La^T with contiguous reflectors, and Q
// is never formed: Qb cv and Vt Qa^T are applied through the reflectors
// (Dormlq, about 4 m R k flops instead of Dorgqr's 4 m R^2).
func lowRankSVDLQ(b, a []float64, m, r, n int, rank func(s []float64) int) (bk, ak, s []float64, k int) {
	bt := transpose(b, m, r) // r x m
	var fb householderLQ
	var wg sync.WaitGroup
	wg.Go(func() { fb = factorLQ(bt, r, m) })
	fa := factorLQ(a, r, n) // in place: a is the caller's scratch (see LowRankSVD)
	wg.Wait()
	pb, pa := fb.p, fa.p
	core, sv, vtc, k, kk := coreSVD(fb.lT(), fa.lT(), pb, pa, r, rank) // L^T: the R of the QR of x^T
	bk = make([]float64, m*k)
	ak = make([]float64, k*n)
	if kk == 0 {
		return bk, ak, sv, k
	}
	// bk[:, :kk] = Qb'^T [cv; 0], cv = core V[:, :kk] = Uc S (pb x kk)
	cv := blas64.General{Rows: pb, Cols: kk, Stride: k, Data: bk}
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: pb, Cols: pa, Stride: pa, Data: core},
		blas64.General{Rows: kk, Cols: pa, Stride: pa, Data: vtc},
		0, cv)
	fb.apply(blas.Left, blas.Trans, blas64.General{Rows: m, Cols: kk, Stride: k, Data: bk})
	// ak = [Vt[:kk, :] 0] Qa_full = Vt[:kk, :] Qa'
	for j := 0; j < kk; j++ {
		copy(ak[j*n:j*n+pa], vtc[j*pa:(j+1)*pa])
	}
	fa.apply(blas.Right, blas.NoTrans, blas64.General{Rows: kk, Cols: n, Stride: n, Data: ak})
	canonicalSigns(bk, ak, m, n, k, kk)
	return bk, ak, sv, k
}

// householderLQ is an LQ of a rows x cols matrix as gonum's Dgelqf leaves
// it: L in the lower triangle of x, Q as p = min(rows, cols) Householder
// reflectors (rows of x) right of it, with their factors tau.
type householderLQ struct {
	x             []float64
	rows, cols, p int
	tau           []float64
}

// factorLQ computes the Householder LQ of x (rows x cols, row-major,
// overwritten).
func factorLQ(x []float64, rows, cols int) householderLQ {
	f := householderLQ{x: x, rows: rows, cols: cols, p: min(rows, cols)}
	g := blas64.General{Rows: rows, Cols: cols, Stride: cols, Data: x}
	f.tau = make([]float64, f.p)
	work := []float64{0}
	lapack64.Gelqf(g, f.tau, work, -1)
	work = make([]float64, max(1, int(work[0])))
	lapack64.Gelqf(g, f.tau, work, len(work))
	return f
}

// lT returns L^T (p x rows, upper triangular): the R of the QR of x^T.
func (f householderLQ) lT() []float64 {
	rf := make([]float64, f.p*f.rows)
	for i := 0; i < f.rows; i++ {
		for j := 0; j <= min(i, f.p-1); j++ {
			rf[j*f.rows+i] = f.x[i*f.cols+j]
		}
	}
	return rf
}

// apply replaces c by op(Q) c (side Left) or c op(Q) (side Right), Q the
// cols x cols orthogonal matrix of the reflectors (gonum's Dormlq).
func (f householderLQ) apply(side blas.Side, trans blas.Transpose, c blas64.General) {
	a := blas64.General{Rows: f.p, Cols: f.cols, Stride: f.cols, Data: f.x}
	work := []float64{0}
	lapack64.Ormlq(side, trans, a, f.tau, c, work, -1)
	work = make([]float64, max(1, int(work[0])))
	lapack64.Ormlq(side, trans, a, f.tau, c, work, len(work))
}

// canonicalSigns flips the sign of component j (column j of bk, m x k, and
// row j of ak, k x n) for j < kk so that the largest |entry| of the left
// vector is positive.
func canonicalSigns(bk, ak []float64, m, n, k, kk int) {
	for j := 0; j < kk; j++ {
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
}
