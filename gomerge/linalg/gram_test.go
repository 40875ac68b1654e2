package linalg

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"
)

// gramStack builds a stack of three rank-r/3 adapters (m x r and r x n,
// entries ~ N(0, 0.02^2), B's blocks scaled by the adapters' weights) and
// lets the case shape it.
func gramStack(rng *rand.Rand, m, r, n int, shape func(b, a []float64)) (b, a []float64) {
	b = make([]float64, m*r)
	a = make([]float64, r*n)
	weights := []float64{2, 1, 0.25}
	for i := range b {
		b[i] = rng.NormFloat64() * 0.02 * weights[(i%r)*3/r]
	}
	for i := range a {
		a[i] = rng.NormFloat64() * 0.02
	}
	if shape != nil {
		shape(b, a)
	}
	return b, a
}

// TestLowRankSVDGramRoute checks the Gram route against gonum's dense SVD of
// B A, and that ill-conditioned and rank-deficient stacks take the
// Householder fallback (which must then agree with the dense SVD too).
func TestLowRankSVDGramRoute(t *testing.T) {
	const m, r, n, k = 1760, 24, 100, 8 // (m + n) R^2 >= gramMin; short side 100 keeps the dense SVD cheap
	require.True(t, useGram(m, r, n), "the cases must be in the Gram route's range")
	scaleCol := func(b []float64, j int, s float64) {
		for i := 0; i < m; i++ {
			b[i*r+j] *= s
		}
	}
	tests := []struct {
		name  string
		shape func(b, a []float64)
		gram  bool
	}{
		{"well conditioned", nil, true},
		{"weights 1e3 apart (equilibrated)", func(b, _ []float64) {
			for j := 0; j < 8; j++ {
				scaleCol(b, j, 1e3)
			}
		}, true},
		{"kappa ~1e2 (below the bound)", func(b, _ []float64) {
			for i := 0; i < m; i++ {
				b[i*r+1] = b[i*r] + 1e-2*b[i*r+1]
			}
		}, true},
		{"identical adapters", func(b, a []float64) {
			for i := 0; i < m; i++ {
				copy(b[i*r+8:i*r+16], b[i*r:i*r+8])
			}
			copy(a[8*n:16*n], a[:8*n])
		}, false},
		{"a zero adapter", func(b, _ []float64) {
			for j := 16; j < 24; j++ {
				scaleCol(b, j, 0)
			}
		}, false},
		{"nearly dependent columns of B (kappa ~1e6)", func(b, _ []float64) {
			for i := 0; i < m; i++ {
				b[i*r+1] = b[i*r] + 1e-6*b[i*r+1]
			}
		}, false},
		{"nearly dependent rows of A (kappa ~1e5)", func(_, a []float64) {
			for j := 0; j < n; j++ {
				a[5*n+j] = a[4*n+j] + 1e-5*a[5*n+j]
			}
		}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			b, a := gramStack(rand.New(rand.NewPCG(7, 8)), m, r, n, tc.shape)
			want, wantS := denseTruncated(b, a, m, r, n, k)
			rank := func([]float64) int { return k }
			b0, a0 := append([]float64(nil), b...), append([]float64(nil), a...)
			_, _, _, _, ok := lowRankSVDGram(b, a, m, r, n, rank)
			require.Equal(t, tc.gram, ok, "route taken")
			require.Equal(t, b0, b, "the Gram route leaves B untouched")
			require.Equal(t, a0, a, "the Gram route leaves A untouched")
			bk, ak, s, kk := LowRankSVDBy(b, a, m, r, n, rank)
			require.Equal(t, k, kk)
			// The Gram route's relative error is about R kappa^2 u <= 24e6 u (gramKappaMax = 1e3); the
			// Householder route's is about R u; the dense reference's about max(m, n) u. 1e-8 bounds all.
			const tol = 1e-8
			for i := 0; i < k; i++ {
				assert.InDelta(t, wantS[i], s[i], tol*wantS[0], "singular value %d", i)
			}
			var got mat.Dense
			got.Mul(mat.NewDense(m, k, bk), mat.NewDense(k, n, ak))
			assert.True(t, mat.EqualApprox(&got, want, tol*mat.Norm(want, 2)), "B'A' differs from the dense truncated SVD")
			var gram mat.Dense
			akm := mat.NewDense(k, n, ak)
			gram.Mul(akm, akm.T())
			for i := 0; i < k; i++ {
				for j := 0; j < k; j++ {
					assert.InDelta(t, b2f(i == j), gram.At(i, j), tol, "A'A'^T at %d, %d", i, j)
				}
			}
		})
	}
}

// TestLowRankSVDGramMatchesHouseholder compares the two routes on S1's
// TinyLlama shapes (stack rank 24, truncated to 8).
func TestLowRankSVDGramMatchesHouseholder(t *testing.T) {
	for _, sh := range []struct{ m, n int }{{2048, 2048}, {5632, 2048}, {256, 2048}} {
		const r, k = 24, 8
		require.True(t, useGram(sh.m, r, sh.n))
		b, a := gramStack(rand.New(rand.NewPCG(1, 9)), sh.m, r, sh.n, nil)
		rank := func([]float64) int { return k }
		gb, ga, gs, _, ok := lowRankSVDGram(b, a, sh.m, r, sh.n, rank)
		require.True(t, ok)
		hb, ha, hs, _ := lowRankSVDQR(b, a, sh.m, r, sh.n, rank)
		for i := range hs {
			require.InDelta(t, hs[i], gs[i], 1e-10*hs[0], "singular value %d of %dx%d", i, sh.m, sh.n)
		}
		// canonical signs make the factors themselves comparable (distinct singular values)
		maxDiff := func(x, y []float64) float64 {
			d, s := 0.0, 0.0
			for i := range x {
				d, s = math.Max(d, math.Abs(x[i]-y[i])), math.Max(s, math.Abs(y[i]))
			}
			return d / s
		}
		assert.Less(t, maxDiff(gb, hb), 1e-8, "B' of %dx%d", sh.m, sh.n)
		assert.Less(t, maxDiff(ga, ha), 1e-8, "A' of %dx%d", sh.m, sh.n)
	}
}

func b2f(x bool) float64 {
	if x {
		return 1
	}
	return 0
}
