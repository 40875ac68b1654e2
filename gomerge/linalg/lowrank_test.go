package linalg

import (
	"math"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"
)

// denseTruncated is the reference: a dense SVD of B @ A truncated to rank k.
func denseTruncated(b, a []float64, m, r, n, k int) (*mat.Dense, []float64) {
	bm := mat.NewDense(m, r, b)
	am := mat.NewDense(r, n, a)
	var d mat.Dense
	d.Mul(bm, am)
	var svd mat.SVD
	if !svd.Factorize(&d, mat.SVDThin) {
		panic("svd failed")
	}
	var u, v mat.Dense
	svd.UTo(&u)
	svd.VTo(&v)
	s := svd.Values(nil)
	q := len(s)
	kk := min(k, q)
	out := mat.NewDense(m, n, nil)
	for j := 0; j < kk; j++ {
		for i := 0; i < m; i++ {
			for l := 0; l < n; l++ {
				out.Set(i, l, out.At(i, l)+u.At(i, j)*s[j]*v.At(l, j))
			}
		}
	}
	return out, s
}

func TestLowRankSVDMatchesDenseSVD(t *testing.T) {
	tests := []struct {
		name       string
		m, r, n, k int
	}{
		{"square truncated", 20, 12, 20, 4},
		{"tall", 40, 9, 7, 3},
		{"wide", 6, 10, 30, 5},
		{"k equals rank", 25, 6, 18, 6},
		{"k above rank pads zeros", 15, 3, 11, 8},
		{"rank above both dims", 5, 12, 4, 4},
		// above implicitQMin: the LQs and Dormlq (lowRankSVDLQ)
		{"large, tall (LQ path)", 720, 80, 700, 10},
		{"large, wide, k above rank (LQ path)", 600, 90, 800, 100},
	}
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b := make([]float64, tc.m*tc.r)
			a := make([]float64, tc.r*tc.n)
			for i := range b {
				b[i] = rng.NormFloat64()
			}
			for i := range a {
				a[i] = rng.NormFloat64()
			}
			want, wantS := denseTruncated(b, a, tc.m, tc.r, tc.n, tc.k)
			bk, ak, s := LowRankSVD(append([]float64(nil), b...), append([]float64(nil), a...), tc.m, tc.r, tc.n, tc.k)
			require.Len(t, bk, tc.m*tc.k)
			require.Len(t, ak, tc.k*tc.n)
			for i := 0; i < min(len(s), len(wantS)); i++ {
				assert.InDelta(t, wantS[i], s[i], 1e-9*wantS[0], "singular value %d", i)
			}
			var got mat.Dense
			got.Mul(mat.NewDense(tc.m, tc.k, bk), mat.NewDense(tc.k, tc.n, ak))
			assert.True(t, mat.EqualApprox(&got, want, 1e-9*mat.Norm(want, math.Inf(1))), "B'A' differs from the dense truncated SVD")
			// A' has orthonormal rows (for the components that exist)
			kk := min(tc.k, len(s), tc.m, tc.n)
			for i := 0; i < kk; i++ {
				for j := 0; j < kk; j++ {
					dot := 0.0
					for l := 0; l < tc.n; l++ {
						dot += ak[i*tc.n+l] * ak[j*tc.n+l]
					}
					if i == j {
						assert.InDelta(t, 1, dot, 1e-9)
					} else {
						assert.InDelta(t, 0, dot, 1e-9)
					}
				}
			}
			// canonical signs: the largest |entry| of each column of B' is positive
			for j := 0; j < kk; j++ {
				best := 0.0
				for i := 0; i < tc.m; i++ {
					if math.Abs(bk[i*tc.k+j]) > math.Abs(best) {
						best = bk[i*tc.k+j]
					}
				}
				assert.GreaterOrEqual(t, best, 0.0)
			}
		})
	}
}

func BenchmarkLowRankSVD4096x4096Rank48(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	m, r, n := 4096, 48, 4096
	bb := make([]float64, m*r)
	aa := make([]float64, r*n)
	for i := range bb {
		bb[i] = rng.NormFloat64()
	}
	for i := range aa {
		aa[i] = rng.NormFloat64()
	}
	for b.Loop() {
		LowRankSVD(append([]float64(nil), bb...), append([]float64(nil), aa...), m, r, n, 16)
	}
}

// TestRandomizedSVDAccuracy checks the range finder against a dense SVD on
// matrices wide enough to use a real sketch, with fast and slow spectral
// decay: the reconstruction error stays within 1% of the optimal rank-k error.
func TestRandomizedSVDAccuracy(t *testing.T) {
	tests := []struct {
		name  string
		m, n  int
		k     int
		decay float64 // singular values ~ decay^i plus a noise floor
		exact bool    // a short side: the exact path
	}{
		{"fast decay", 200, 300, 8, 0.7, false},
		{"exact path for a short side", 60, 300, 8, 0.9, true},
		{"slow decay", 240, 300, 16, 0.97, false},
		{"flat tail", 160, 260, 8, 0.999, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			rng := rand.New(rand.NewPCG(11, 12))
			q := min(tc.m, tc.n)
			u := orthonormal(rng, tc.m, q)
			v := orthonormal(rng, tc.n, q)
			d := make([]float32, tc.m*tc.n)
			for c := 0; c < q; c++ {
				s := math.Pow(tc.decay, float64(c)) + 0.01
				for i := 0; i < tc.m; i++ {
					for j := 0; j < tc.n; j++ {
						d[i*tc.n+j] += float32(u[i*q+c] * s * v[j*q+c])
					}
				}
			}
			dd := make([]float64, len(d))
			for i, x := range d {
				dd[i] = float64(x)
			}
			var svd mat.SVD
			require.True(t, svd.Factorize(mat.NewDense(tc.m, tc.n, dd), mat.SVDNone))
			sv := svd.Values(nil)
			optimal := 0.0
			for _, s := range sv[tc.k:] {
				optimal += s * s
			}
			bk, ak := RandomizedSVD(d, tc.m, tc.n, tc.k, rand.New(rand.NewPCG(1, 1)))
			sketched := min(tc.m, tc.n) > (2*RSVDPowerIters+2)*(tc.k+RSVDOversample)
			require.Equal(t, !tc.exact, sketched, "the case must take the path it is named for")
			errSq := 0.0
			for i := 0; i < tc.m; i++ {
				for j := 0; j < tc.n; j++ {
					approx := 0.0
					for c := 0; c < tc.k; c++ {
						approx += bk[i*tc.k+c] * ak[c*tc.n+j]
					}
					diff := dd[i*tc.n+j] - approx
					errSq += diff * diff
				}
			}
			ratio := math.Sqrt(errSq / optimal)
			t.Logf("error / optimal = %.6f", ratio)
			if tc.exact {
				assert.InDelta(t, 1, ratio, 1e-6)
			} else {
				assert.Less(t, ratio, 1.01)
			}
		})
	}
}

func orthonormal(rng *rand.Rand, rows, cols int) []float64 {
	x := make([]float64, rows*cols)
	for i := range x {
		x[i] = rng.NormFloat64()
	}
	q, _, _ := ThinQR(x, rows, cols)
	return q
}

// A pruned update (sparse, with structured zeros: the magnitude pruning of
// a weighted sum of three rank-8 updates) through the exact
// path of RandomizedSVD: the right factor keeps orthonormal rows and the
// error is the optimal rank-k error.
func TestExactSVDOfPrunedUpdate(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	m, n, r, k := 64, 64, 8, 4
	ts := make([][]float32, 3)
	for i := range ts {
		b, a := make([]float64, m*r), make([]float64, r*n)
		for j := range b {
			b[j] = rng.NormFloat64()
		}
		for j := range a {
			a[j] = rng.NormFloat64()
		}
		ts[i] = make([]float32, m*n)
		for x := 0; x < m; x++ {
			for y := 0; y < n; y++ {
				for l := 0; l < r; l++ {
					ts[i][x*n+y] += float32(b[x*r+l] * a[l*n+y])
				}
			}
		}
	}
	d := make([]float32, m*n)
	for x := range d {
		d[x] = 2*ts[0][x] + ts[1][x] + ts[2][x]
	}
	mags := make([]float64, len(d))
	for x, v := range d {
		mags[x] = math.Abs(float64(v))
	}
	slices.Sort(mags)
	cut := mags[len(mags)*4/5] // keeps the largest 20%
	for x, v := range d {
		if math.Abs(float64(v)) < cut {
			d[x] = 0
		}
	}
	bk, ak, _, _ := exactSVD(d, m, n, func([]float64) int { return k })
	for i := 0; i < k; i++ {
		for j := 0; j < k; j++ {
			dot := 0.0
			for l := 0; l < n; l++ {
				dot += ak[i*n+l] * ak[j*n+l]
			}
			want := 0.0
			if i == j {
				want = 1
			}
			require.InDelta(t, want, dot, 1e-10, "rows %d, %d of the right factor", i, j)
		}
	}
	dm := mat.NewDense(m, n, nil)
	for x := 0; x < m; x++ {
		for y := 0; y < n; y++ {
			dm.Set(x, y, float64(d[x*n+y]))
		}
	}
	var svd mat.SVD
	require.True(t, svd.Factorize(dm, mat.SVDNone))
	opt := 0.0
	for _, s := range svd.Values(nil)[k:] {
		opt += s * s
	}
	err := 0.0
	for x := 0; x < m; x++ {
		for y := 0; y < n; y++ {
			v := float64(d[x*n+y])
			for l := 0; l < k; l++ {
				v -= bk[x*k+l] * ak[l*n+y]
			}
			err += v * v
		}
	}
	assert.InDelta(t, math.Sqrt(opt), math.Sqrt(err), 1e-9*math.Sqrt(opt))
}
