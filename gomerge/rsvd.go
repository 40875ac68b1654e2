package gomerge

import (
	"math/rand/v2"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas32"
)

// Settings of the randomized SVD used for dense updates (the pruned *_svd
// merges). They meet the accuracy contract (reconstruction error within 1% of
// the optimal rank-k error) on the tests and on the benchmark shapes.
const (
	RSVDOversample = 10 // extra columns of the sketch beyond k
	RSVDPowerIters = 2  // power iterations (each one a D^T and a D product)
)

// RandomizedSVD computes a rank-k truncated SVD of the dense m x n float32
// matrix d with a randomized range finder and power iterations (Halko,
// Martinsson and Tropp 2011, algorithms 4.4 and 5.1): Q spans D (D^T D)^q
// Omega, then D ~ Q (Q^T D) is factorised exactly by LowRankSVD. The cost is
// about (2q + 2) * 2mnl flops with l = k + oversampling, instead of a dense
// SVD's O(mn min(m, n)); matrices with a short side get their exact SVD,
// which is then as cheap. Results are returned like LowRankSVD's:
// Bk = U_k S_k (m x k) and Ak = V_k^T (k x n), with canonical signs.
func RandomizedSVD(d []float32, m, n, k int, rng *rand.Rand) (bk, ak []float64) {
	l := min(k+RSVDOversample, m, n)
	if l <= 0 {
		return make([]float64, m*k), make([]float64, k*n)
	}
	if q := min(m, n); q <= (2*RSVDPowerIters+2)*l {
		// A thin matrix: its exact SVD (one QR of the long side, ~2 max(m,n) q^2 flops) costs no more than the
		// sketch would, so take it.
		return exactSVD(d, m, n, k)
	}
	D := blas32.General{Rows: m, Cols: n, Stride: n, Data: d}
	omega := make([]float32, n*l)
	for i := range omega {
		omega[i] = float32(rng.NormFloat64())
	}
	z := blas32.General{Rows: n, Cols: l, Stride: l, Data: omega}
	y := blas32.General{Rows: m, Cols: l, Stride: l, Data: make([]float32, m*l)}
	blas32.Gemm(blas.NoTrans, blas.NoTrans, 1, D, z, 0, y) // Y = D Omega
	orthonormalize32(y)
	for it := 0; it < RSVDPowerIters; it++ {
		blas32.Gemm(blas.Trans, blas.NoTrans, 1, D, y, 0, z) // Z = D^T Q
		orthonormalize32(z)
		blas32.Gemm(blas.NoTrans, blas.NoTrans, 1, D, z, 0, y) // Y = D Z
		orthonormalize32(y)
	}
	// B^T = D^T Q (n x l); D ~ Q B, a product of rank l
	blas32.Gemm(blas.Trans, blas.NoTrans, 1, D, y, 0, z)
	q64 := make([]float64, m*l)
	for i, v := range y.Data {
		q64[i] = float64(v)
	}
	b64 := make([]float64, l*n)
	for i := 0; i < n; i++ {
		for j := 0; j < l; j++ {
			b64[j*n+i] = float64(z.Data[i*l+j])
		}
	}
	bk, ak, _ = LowRankSVD(q64, b64, m, l, n, k)
	return bk, ak
}

// exactSVD is the rank-k truncated SVD of a dense matrix with a short side:
// D = I D (or D I) factorised by LowRankSVD.
func exactSVD(d []float32, m, n, k int) (bk, ak []float64) {
	d64 := make([]float64, len(d))
	for i, v := range d {
		d64[i] = float64(v)
	}
	if m <= n {
		return lowRankK(identity(m), d64, m, m, n, k)
	}
	return lowRankK(d64, identity(n), m, n, n, k)
}

func lowRankK(b, a []float64, m, r, n, k int) (bk, ak []float64) {
	bk, ak, _ = LowRankSVD(b, a, m, r, n, k)
	return bk, ak
}

func identity(n int) []float64 {
	x := make([]float64, n*n)
	for i := 0; i < n; i++ {
		x[i*n+i] = 1
	}
	return x
}

// orthonormalize32 replaces the columns of g by an orthonormal basis of
// their span (a thin QR computed in float64).
func orthonormalize32(g blas32.General) {
	x := make([]float64, g.Rows*g.Cols)
	for i, v := range g.Data[:g.Rows*g.Cols] {
		x[i] = float64(v)
	}
	q, _, p := thinQR(x, g.Rows, g.Cols)
	clear(g.Data)
	for i := 0; i < g.Rows; i++ {
		for j := 0; j < p; j++ {
			g.Data[i*g.Cols+j] = float32(q[i*p+j])
		}
	}
}

// denseDelta returns scaling * B @ A (out x in) in float32, as PEFT's
// get_delta_weight computes it (the product, then the scaling), in a buffer
// from the pool. Rows are computed in parallel as sums of scaled rows of A.
func denseDelta(a, b []float32, out, r, in int, scaling float64) []float32 {
	dw := getBuf(out * in)
	s := float32(scaling)
	impl := blas32.Implementation()
	parallelFor(out, max(1, (1<<16)/max(1, in*r)), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			row := dw[i*in : (i+1)*in]
			clear(row)
			for k := 0; k < r; k++ {
				impl.Saxpy(in, b[i*r+k], a[k*in:(k+1)*in], 1, row, 1)
			}
			impl.Sscal(in, s, row, 1)
		}
	})
	return dw
}
