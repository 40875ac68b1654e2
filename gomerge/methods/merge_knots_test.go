package methods

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"
)

// knotsDense is the dense reference of KnOTS's alignment: the thin SVD of
// the concatenated unweighted updates [s_1 B_1 A_1 ... s_T B_T A_T] and the
// task representations X_t = diag(S) V_t^T (k x n).
func knotsDense(t *testing.T, srcs []Source, out, in int) (u *mat.Dense, xs []*mat.Dense) {
	cat := mat.NewDense(out, in*len(srcs), nil)
	for i, s := range srcs {
		d := denseUpdate(t, s)
		d.Scale(1/s.Weight, d)
		cat.Slice(0, out, i*in, (i+1)*in).(*mat.Dense).Copy(d)
	}
	u, sv, v := thinSVD(cat)
	k := len(sv)
	for i := range srcs {
		x := mat.DenseCopyOf(v.Slice(i*in, (i+1)*in, 0, k).T())
		for r := 0; r < k; r++ {
			for j := 0; j < in; j++ {
				x.Set(r, j, x.At(r, j)*sv[r])
			}
		}
		xs = append(xs, x)
	}
	return u, xs
}

func TestKnotsMatchesDenseReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(21, 22))
	density, scaling := 0.4, 0.7
	for _, tc := range spanShapes {
		srcs := spanSources(rng, tc.out, tc.in, tc.ranks...)
		u, xs := knotsDense(t, srcs, tc.out, tc.in)
		for _, c := range []struct{ method, comb string }{{"knots_ties", "ties"}, {"knots_linear", "magnitude_prune"}} {
			t.Run(c.method+"/"+tc.name, func(t *testing.T) {
				tensors := make([][]float32, len(xs))
				weights := make([]float32, len(xs))
				for i, x := range xs {
					tensors[i] = ToFloat32(x.RawMatrix().Data)
					weights[i] = float32(srcs[i].Weight)
				}
				merged := comb(c.comb, density).Apply(tensors, weights, nil, false)
				_, k := u.Dims()
				var want mat.Dense
				want.Mul(u, mat.NewDense(k, tc.in, toFloat64(merged)))
				want.Scale(scaling, &want)
				o := Combine{CombinationType: c.method, Density: &density, Scaling: &scaling}
				require.NoError(t, o.Validate())
				a, b, r, _, err := mergeSpan(srcs, &o, 1, tc.in, tc.out, 1, "m")
				require.NoError(t, err)
				assert.LessOrEqual(t, r, k, "rank of the merged update")
				assertClose(t, &want, productOf(a, b, tc.out, r, tc.in), 1e-5, c.method)
			})
		}
	}
}

func TestKnotsLinearWithoutPruningIsTaskArithmetic(t *testing.T) {
	rng := rand.New(rand.NewPCG(23, 24))
	srcs := spanSources(rng, 20, 12, 3, 2, 4)
	var want mat.Dense
	for i, s := range srcs {
		if i == 0 {
			want.CloneFrom(denseUpdate(t, s))
		} else {
			want.Add(&want, denseUpdate(t, s))
		}
	}
	one := 1.0
	o := Combine{CombinationType: "knots_linear", Density: &one}
	require.NoError(t, o.Validate())
	a, b, k, _, err := mergeSpan(srcs, &o, 1, 12, 20, 1, "m")
	require.NoError(t, err)
	assert.Equal(t, 9, k)
	assertClose(t, &want, productOf(a, b, 20, k, 12), 1e-5, "knots_linear density 1")
}

func TestCoreIsoCMatchesDenseReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(25, 26))
	scaling := 1.3
	for _, tc := range spanShapes {
		srcs := spanSources(rng, tc.out, tc.in, tc.ranks...)
		t.Run(tc.name, func(t *testing.T) {
			ub, va, ms := coreMatrices(t, srcs, tc.out, tc.in, func(s Source) float64 { return s.Weight * s.Mod.Scaling })
			sum := mat.DenseCopyOf(ms[0])
			for _, m := range ms[1:] {
				sum.Add(sum, m)
			}
			var svd mat.SVD
			require.True(t, svd.Factorize(sum, mat.SVDThin))
			var uu, vv mat.Dense
			svd.UTo(&uu)
			svd.VTo(&vv)
			mean := 0.0
			vals := svd.Values(nil)
			for _, v := range vals {
				mean += v
			}
			mean = mean / float64(len(vals)) * scaling
			var iso, tmp, want mat.Dense
			iso.Mul(&uu, vv.T())
			iso.Scale(mean, &iso)
			tmp.Mul(ub, &iso)
			want.Mul(&tmp, va.T())
			o := Combine{CombinationType: "core_iso_c", Scaling: &scaling}
			require.NoError(t, o.Validate())
			a, b, k, _, err := mergeSpan(srcs, &o, 1, tc.in, tc.out, 1, "m")
			require.NoError(t, err)
			assertClose(t, &want, productOf(a, b, tc.out, k, tc.in), 1e-6, "core_iso_c")
		})
	}
}

// TestDAREVariantsOfSpanMethods: with density 1 DARE keeps every value, so
// core_dare_ties and knots_dare_ties equal their TIES methods at density 1;
// below 1 the masks follow the seed and the module.
func TestDAREVariantsOfSpanMethods(t *testing.T) {
	rng := rand.New(rand.NewPCG(27, 28))
	srcs := spanSources(rng, 24, 16, 4, 4, 3)
	run := func(method string, density float64, seed uint64, module string) []float64 {
		o := Combine{CombinationType: method, Density: &density}
		require.NoError(t, o.Validate())
		a, b, k, _, err := mergeSpan(srcs, &o, 1, 16, 24, seed, module)
		require.NoError(t, err)
		return productOf(a, b, 24, k, 16)
	}
	for _, c := range []struct{ dare, ties string }{{"core_dare_ties", "core_ties"}, {"knots_dare_ties", "knots_ties"}} {
		t.Run(c.dare, func(t *testing.T) {
			want := run(c.ties, 1, 1, "m")
			assertClose(t, mat.NewDense(24, 16, want), run(c.dare, 1, 7, "m"), 1e-6, c.dare+" at density 1")
			first := run(c.dare, 0.5, 7, "m")
			assert.Equal(t, first, run(c.dare, 0.5, 7, "m"), "same seed, same module: same result")
			assert.NotEqual(t, first, run(c.dare, 0.5, 8, "m"), "another seed")
			assert.NotEqual(t, first, run(c.dare, 0.5, 7, "other"), "another module")
		})
	}
}
