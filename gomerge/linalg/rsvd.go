package linalg

import (
	"math/rand/v2"
	"slices"

	"gonum.org/v1/gonum/blas/blas32"

	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/kernels"
	"gomerge/gomerge/parallel"
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
	bk, ak, _, _ = RandomizedSVDBy(d, m, n, k, RSVDPowerIters, rng, func([]float64) int { return k })
	return bk, ak
}

// RandomizedSVDBy is RandomizedSVD with power iterations and a sketch for k
// components whose output rank is chosen by rank from the singular values of
// the sketch's factorisation (decreasing; the first k are accurate): it
// returns the factors at that rank, those singular values and the rank.
func RandomizedSVDBy(d []float32, m, n, k, power int, rng *rand.Rand, rank func(s []float64) int) (bk, ak, s []float64, r int) {
	return RandomizedSVDWith(d, m, n, k, RSVDOversample, power, rng, rank)
}

// RandomizedSVDWith is RandomizedSVDBy with oversample extra columns in the
// sketch (instead of RSVDOversample).
func RandomizedSVDWith(d []float32, m, n, k, oversample, power int, rng *rand.Rand, rank func(s []float64) int) (bk, ak, s []float64, r int) {
	l := min(k+oversample, m, n)
	if l <= 0 {
		r = rank(nil)
		return make([]float64, m*r), make([]float64, r*n), nil, r
	}
	if q := min(m, n); q <= (2*power+2)*l {
		// A thin matrix: its exact SVD (one QR of the long side, ~2 max(m,n) q^2 flops) costs no more than the
		// sketch would, so take it.
		return exactSVD(d, m, n, rank)
	}
	// The sketch is kept transposed (zt is l x n): both products read it and D in rows.
	zt := make([]float32, l*n)
	for i := range zt {
		zt[i] = float32(rng.NormFloat64())
	}
	y := make([]float32, m*l)
	mulDZ(d, m, n, zt, l, y) // Y = D Omega
	orthonormalize32(blas32.General{Rows: m, Cols: l, Stride: l, Data: y})
	for it := 0; it < power; it++ {
		mulDtY(d, m, n, y, l, zt) // Z = D^T Q
		orthonormalizeRows32(zt, l, n)
		mulDZ(d, m, n, zt, l, y) // Y = D Z
		orthonormalize32(blas32.General{Rows: m, Cols: l, Stride: l, Data: y})
	}
	mulDtY(d, m, n, y, l, zt) // B = Q^T D (l x n); D ~ Q B, a product of rank l
	q64 := make([]float64, m*l)
	for i, v := range y {
		q64[i] = float64(v)
	}
	b64 := make([]float64, l*n)
	for i, v := range zt {
		b64[i] = float64(v)
	}
	return LowRankSVDBy(q64, b64, m, l, n, rank)
}

// mulDZ computes y (m x l) = D (m x n) @ Z, with Z given transposed as zt
// (l x n), by kernels.Gemm32 (blocked, vectorised, on all cores; each entry
// one chain of fused multiply-adds in order: the same bits everywhere).
func mulDZ(d []float32, m, n int, zt []float32, l int, y []float32) {
	if !blockedProducts() {
		mulDZDots(d, m, n, zt, l, y)
		return
	}
	gemm(kernels.Matrix{Rows: m, Cols: n, Stride: n, Data: d},
		kernels.Matrix{Rows: n, Cols: l, Stride: n, Trans: true, Data: zt}, y, l)
}

// mulDtY computes zt (l x n) = (D^T @ Y)^T = Y^T D for y (m x l), by
// kernels.Gemm32.
func mulDtY(d []float32, m, n int, y []float32, l int, zt []float32) {
	if !blockedProducts() {
		mulDtYAxpy(d, m, n, y, l, zt)
		return
	}
	gemm(kernels.Matrix{Rows: l, Cols: m, Stride: l, Trans: true, Data: y},
		kernels.Matrix{Rows: m, Cols: n, Stride: n, Data: d}, zt, n)
}

// gemm is kernels.Gemm32 on shapes that its callers have checked.
func gemm(a, b kernels.Matrix, c []float32, ldc int) {
	if err := kernels.Gemm32(a, b, c, ldc); err != nil {
		panic("gomerge: " + err.Error())
	}
}

// blockedProducts says whether the products run on kernels.Gemm32 and
// kernels.Gemm64: on the vector kernel sets (avx2, avx512), whose FMA
// micro-kernels are several times faster than gonum. The portable set
// keeps gonum's products and their order of additions, since its scalar
// emulation of the float32 FMA chain is slower than gonum (0.9 against
// 2.6-6.7 GFLOP/s here), and math.FMA is emulated in software on x86 CPUs
// without FMA. Results therefore differ between the portable and the
// vector sets in the last bits (about 4e-7 relative) where a sketch runs;
// tests/golden/corpus.json holds the vector sets' hashes as case@avx2 and
// case@avx512 where they differ.
func blockedProducts() bool { return kernels.InUse() != "go" }

// mulDZDots is mulDZ on the portable kernel set (the order of additions of
// gonum's Sdot, as before the blocked product: portable CPUs keep its speed).
// It computes y (m x l) = D (m x n) @ Z, with Z given transposed as zt
// (l x n): one dot product per entry (kernels.Dots: gonum's Sdot's order of
// additions), rows of D in parallel.
func mulDZDots(d []float32, m, n int, zt []float32, l int, y []float32) {
	parallel.For(m, max(4, (1<<18)/max(1, n*l)), func(lo, hi int) {
		kernels.Dots(y[lo*l:hi*l], d[lo*n:hi*n], zt[:l*n], hi-lo, l, n)
	})
}

// mulDtYAxpy is mulDtY on the portable kernel set. It computes zt (l x n) = (D^T @ Y)^T = Y^T D for y (m x l): each row
// of D is added, scaled, to the l rows of zt. Rows are cut into a fixed
// number of blocks whose partial sums are added in block order, so the
// result does not depend on how many cores ran them.
func mulDtYAxpy(d []float32, m, n int, y []float32, l int, zt []float32) {
	impl := blas32.Implementation()
	blocks := max(1, min(mulDtYBlocks, m/64))
	parts := make([][]float32, blocks)
	size := (m + blocks - 1) / blocks
	parallel.For(blocks, 1, func(blo, bhi int) {
		for b := blo; b < bhi; b++ {
			part := zt
			if b > 0 {
				part = make([]float32, l*n)
			} else {
				clear(part)
			}
			parts[b] = part
			r0, r1 := b*size, min((b+1)*size, m)
			if r0 >= r1 {
				continue
			}
			if !slices.Contains(y[r0*l:r1*l], 0) {
				// the rows of the block added in order to tiles of part held in registers
				kernels.MulTInto(part, d[r0*n:r1*n], y[r0*l:r1*l], r1-r0, n, l)
				continue
			}
			// a zero coefficient, which Saxpy skips: rows mulDtYRows at a time, in tiles of columns that stay
			// in the cache, each tile of a row of part read once per mulDtYRows rows of D, which are added to
			// it in row order, skipping zero coefficients
			var as [mulDtYRows]float32
			var xs [mulDtYRows][]float32
			for i0 := r0; i0 < r1; i0 += mulDtYRows {
				i1 := min(i0+mulDtYRows, r1)
				for j0 := 0; j0 < n; j0 += mulDtYTile {
					j1 := min(j0+mulDtYTile, n)
					for c := 0; c < l; c++ {
						k := 0
						for i := i0; i < i1; i++ {
							if a := y[i*l+c]; a != 0 {
								as[k], xs[k] = a, d[i*n+j0:i*n+j1]
								k++
							}
						}
						if k > 0 {
							kernels.AxpyRows(part[c*n+j0:c*n+j1], as[:k], xs[:k])
						}
					}
				}
			}
		}
	})
	for _, p := range parts[1:] {
		impl.Saxpy(l*n, 1, p, 1, zt, 1)
	}
}

// mulDtYRows is how many rows of D mulDtY adds to the sketch at a time, in
// tiles of mulDtYTile columns.
const (
	mulDtYRows = 8
	mulDtYTile = 512
)

// mulDtYBlocks is the number of partial sums of mulDtY (at least the number
// of cores worth using; fixed for reproducible results).
const mulDtYBlocks = 8

// orthonormalizeRows32 replaces the rows of x (r x n) by an orthonormal
// basis of their span.
func orthonormalizeRows32(x []float32, r, n int) {
	t := make([]float32, n*r)
	for i := 0; i < r; i++ {
		for j := 0; j < n; j++ {
			t[j*r+i] = x[i*n+j]
		}
	}
	orthonormalize32(blas32.General{Rows: n, Cols: r, Stride: r, Data: t})
	for i := 0; i < r; i++ {
		for j := 0; j < n; j++ {
			x[i*n+j] = t[j*r+i]
		}
	}
}

// exactSVD is the truncated SVD of a dense matrix with a short side, at the
// rank chosen by rank: D = I D (or D I) factorised by lowRankSVD.
func exactSVD(d []float32, m, n int, rank func(s []float64) int) (bk, ak, s []float64, k int) {
	d64 := make([]float64, len(d))
	for i, v := range d {
		d64[i] = float64(v)
	}
	if m <= n {
		return LowRankSVDBy(identity(m), d64, m, m, n, rank)
	}
	return LowRankSVDBy(d64, identity(n), m, n, n, rank)
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
	q, _, p := ThinQR(x, g.Rows, g.Cols)
	clear(g.Data)
	for i := 0; i < g.Rows; i++ {
		for j := 0; j < p; j++ {
			g.Data[i*g.Cols+j] = float32(q[i*p+j])
		}
	}
}

// DenseDelta returns scaling * B @ A (out x in) in float32, as PEFT's
// get_delta_weight computes it (the product, then the scaling), in a buffer
// from the pool. Rows are computed in parallel as sums of scaled rows of A,
// added in order, then scaled (kernels.DenseRow: the bits of one Saxpy per
// row of A, which skips zero coefficients as Saxpy does, then Sscal).
func DenseDelta(a, b []float32, out, r, in int, scaling float64) []float32 {
	dw := pool.Get(out * in)
	s := float32(scaling)
	parallel.For(out, max(1, (1<<16)/max(1, in*r)), func(lo, hi int) {
		as := make([]float32, r)
		xs := make([][]float32, r)
		for i := lo; i < hi; i++ {
			n := 0
			for k := 0; k < r; k++ {
				if c := b[i*r+k]; c != 0 {
					as[n], xs[n] = c, a[k*in:(k+1)*in]
					n++
				}
			}
			kernels.DenseRow(dw[i*in:(i+1)*in], as[:n], xs[:n], s)
		}
	})
	return dw
}
