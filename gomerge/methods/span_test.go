package methods

import (
	"gomerge/gomerge/linalg"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
	"gonum.org/v1/gonum/mat"
)

// spanSources draws adapters of the given ranks on an out x in module, each
// with a weight and a scaling.
func spanSources(rng *rand.Rand, out, in int, ranks ...int) []Source {
	srcs := make([]Source, len(ranks))
	for i, r := range ranks {
		a := make([]float32, r*in)
		b := make([]float32, out*r)
		for j := range a {
			a[j] = float32(rng.NormFloat64())
		}
		for j := range b {
			b[j] = float32(rng.NormFloat64())
		}
		srcs[i] = Source{Weight: 0.5 + rng.Float64(), Mod: mod(r, 0.25+rng.Float64(), a, b), Index: i}
	}
	return srcs
}

// denseUpdate is w s B A as a gonum matrix.
func denseUpdate(t *testing.T, s Source) *mat.Dense {
	fa, fb, err := s.Mod.Factors()
	require.NoError(t, err)
	r := s.Mod.Rank
	a := mat.NewDense(r, len(fa)/r, toFloat64(fa))
	b := mat.NewDense(len(fb)/r, r, toFloat64(fb))
	var d mat.Dense
	d.Mul(b, a)
	d.Scale(s.Weight*s.Mod.Scaling, &d)
	return &d
}

// thinSVD returns U, S, V of a dense matrix, restricted to its nonzero
// singular values (numpy's matrix_rank tolerance).
func thinSVD(d *mat.Dense) (u *mat.Dense, s []float64, v *mat.Dense) {
	m, n := d.Dims()
	var svd mat.SVD
	if !svd.Factorize(d, mat.SVDThin) {
		panic("svd failed")
	}
	var uf, vf mat.Dense
	svd.UTo(&uf)
	svd.VTo(&vf)
	s = svd.Values(nil)
	q := numericalRank(s, m, n)
	return mat.DenseCopyOf(uf.Slice(0, m, 0, q)), s[:q], mat.DenseCopyOf(vf.Slice(0, n, 0, q))
}

// polarDense is P Q^T of x = P S Q^T.
func polarDense(x *mat.Dense) *mat.Dense {
	var svd mat.SVD
	if !svd.Factorize(x, mat.SVDThin) {
		panic("svd failed")
	}
	var u, v, p mat.Dense
	svd.UTo(&u)
	svd.VTo(&v)
	p.Mul(&u, v.T())
	return &p
}

// assertClose checks a dense m x n result against a reference, relative to
// the reference's largest entry (the C_t are float64, merged factors float32).
func assertClose(t *testing.T, want *mat.Dense, got []float64, tol float64, msg string) {
	t.Helper()
	m, n := want.Dims()
	require.Len(t, got, m*n)
	scale := mat.Norm(want, math.Inf(1)) + 1e-300
	worst := 0.0
	for i := 0; i < m; i++ {
		for j := 0; j < n; j++ {
			worst = max(worst, math.Abs(got[i*n+j]-want.At(i, j)))
		}
	}
	assert.Less(t, worst/scale, tol, msg)
}

// product is B' A' of the merged factors.
func productOf(a, b []float32, m, k, n int) []float64 {
	d := mat.NewDense(m, n, nil)
	if k > 0 {
		d.Mul(mat.NewDense(m, k, toFloat64(b)), mat.NewDense(k, n, toFloat64(a)))
	}
	return d.RawMatrix().Data
}

var spanShapes = []struct {
	name    string
	out, in int
	ranks   []int
}{
	{"square", 24, 24, []int{4, 8, 6}},
	{"wide", 10, 40, []int{2, 3}},
	{"tall", 50, 12, []int{5, 1, 4, 2}},
	{"rank above a side", 6, 30, []int{4, 5}}, // R = 9 > out
	{"one adapter", 16, 9, []int{3}},
}

func TestSpanCoresReproduceEachUpdate(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for _, tc := range spanShapes {
		t.Run(tc.name, func(t *testing.T) {
			srcs := spanSources(rng, tc.out, tc.in, tc.ranks...)
			sp, err := newSpan(srcs, tc.in, tc.out)
			require.NoError(t, err)
			require.Len(t, sp.cores, len(srcs))
			sum := mat.NewDense(tc.out, tc.in, nil)
			for i, s := range srcs {
				want := denseUpdate(t, s)
				sum.Add(sum, want)
				assertClose(t, want, sp.dense(sp.cores[i]), 1e-12, "C_t reproduces dW_t")
			}
			assertClose(t, sum, sp.dense(sp.sum()), 1e-12, "the summed core reproduces the sum")
		})
	}
}

// isoCDense is the reference Iso-C restricted to the span: U mean(S) V^T
// over the nonzero singular values of the dense sum.
func isoCDense(t *testing.T, srcs []Source, out, in int, scaling float64) *mat.Dense {
	sum := mat.NewDense(out, in, nil)
	for _, s := range srcs {
		sum.Add(sum, denseUpdate(t, s))
	}
	u, s, v := thinSVD(sum)
	mean := 0.0
	for _, x := range s {
		mean += x / float64(len(s))
	}
	var d mat.Dense
	d.Mul(u, v.T())
	d.Scale(mean*scaling, &d)
	return &d
}

// tsvDense is the reference TSV-M on the dense updates, keeping each task's
// min(rank_t, min(m, n) / T) nonzero triplets.
func tsvDense(t *testing.T, srcs []Source, out, in int, scaling float64) *mat.Dense {
	per := min(out, in) / len(srcs)
	var us, vs []*mat.Dense
	var ss []float64
	for _, s := range srcs {
		u, sv, v := thinSVD(denseUpdate(t, s))
		k := min(len(sv), per)
		us = append(us, mat.DenseCopyOf(u.Slice(0, out, 0, k)))
		vs = append(vs, mat.DenseCopyOf(v.Slice(0, in, 0, k)))
		ss = append(ss, sv[:k]...)
	}
	ucat := mat.NewDense(out, len(ss), nil)
	vcat := mat.NewDense(in, len(ss), nil)
	off := 0
	for i := range us {
		_, k := us[i].Dims()
		ucat.Slice(0, out, off, off+k).(*mat.Dense).Copy(us[i])
		vcat.Slice(0, in, off, off+k).(*mat.Dense).Copy(vs[i])
		off += k
	}
	pu, pv := polarDense(ucat), polarDense(vcat)
	for j, s := range ss {
		for i := 0; i < out; i++ {
			pu.Set(i, j, pu.At(i, j)*s*scaling)
		}
	}
	var d mat.Dense
	d.Mul(pu, pv.T())
	return &d
}

// isoCTSDense is the reference Iso-CTS on the dense updates (common_fraction
// 0.8), with q, the rank of the sum, in place of min(m, n).
func isoCTSDense(t *testing.T, srcs []Source, out, in int, scaling float64) *mat.Dense {
	sum := mat.NewDense(out, in, nil)
	var tvs []*mat.Dense
	for _, s := range srcs {
		tvs = append(tvs, denseUpdate(t, s))
		sum.Add(sum, tvs[len(tvs)-1])
	}
	u, s, v := thinSVD(sum)
	q, nt := len(s), len(srcs)
	kc := int(math.Floor(float64(q) * 0.8))
	kc = max(0, q-int(math.RoundToEven(float64(q-kc)/float64(nt)))*nt)
	per := (q - kc) / nt
	uc := mat.DenseCopyOf(u.Slice(0, out, 0, kc))
	cols := []*mat.Dense{uc}
	rows := []*mat.Dense{mat.DenseCopyOf(v.Slice(0, in, 0, kc))}
	ss := append([]float64(nil), s[:kc]...)
	for _, tv := range tvs {
		var proj, res mat.Dense
		proj.Mul(uc.T(), tv)
		res.Mul(uc, &proj)
		res.Sub(tv, &res)
		var full mat.SVD
		require.True(t, full.Factorize(tv, mat.SVDNone))
		s0 := full.Values(nil)[0]
		var svd mat.SVD
		require.True(t, svd.Factorize(&res, mat.SVDThin))
		var ut, vt mat.Dense
		svd.UTo(&ut)
		svd.VTo(&vt)
		st := svd.Values(nil)
		k := 0
		for k < min(per, len(st)) && st[k] > s0*float64(max(out, in))*0x1p-52 {
			k++
		}
		cols = append(cols, mat.DenseCopyOf(ut.Slice(0, out, 0, k)))
		rows = append(rows, mat.DenseCopyOf(vt.Slice(0, in, 0, k)))
		ss = append(ss, st[:k]...)
	}
	ucat := mat.NewDense(out, len(ss), nil)
	vcat := mat.NewDense(in, len(ss), nil)
	off := 0
	for i := range cols {
		_, k := cols[i].Dims()
		if k == 0 {
			continue
		}
		ucat.Slice(0, out, off, off+k).(*mat.Dense).Copy(cols[i])
		vcat.Slice(0, in, off, off+k).(*mat.Dense).Copy(rows[i])
		off += k
	}
	mean := 0.0
	for _, x := range ss {
		mean += x / float64(len(ss))
	}
	var d mat.Dense
	d.Mul(polarDense(ucat), polarDense(vcat).T())
	d.Scale(mean*scaling, &d)
	return &d
}

func TestSpanMethodsMatchDenseReferences(t *testing.T) {
	refs := map[string]func(*testing.T, []Source, int, int, float64) *mat.Dense{
		"iso_c": isoCDense, "tsv": tsvDense, "iso_cts": isoCTSDense}
	rng := rand.New(rand.NewPCG(3, 4))
	for name, ref := range refs {
		for _, tc := range spanShapes {
			for _, scaling := range []float64{1, 0.5} {
				t.Run(name+"/"+tc.name, func(t *testing.T) {
					srcs := spanSources(rng, tc.out, tc.in, tc.ranks...)
					o := Combine{CombinationType: name}
					if scaling != 1 {
						o.Scaling = &scaling
					}
					require.NoError(t, o.Validate())
					total := 0
					for _, r := range tc.ranks {
						total += r
					}
					a, b, k, relErr, err := mergeSpan(srcs, &o, total, tc.in, tc.out, 1, "m")
					require.NoError(t, err)
					want := ref(t, srcs, tc.out, tc.in, scaling)
					var svd mat.SVD
					require.True(t, svd.Factorize(want, mat.SVDNone))
					assert.Equal(t, numericalRank(svd.Values(nil), tc.out, tc.in), k, "rank = the merged update's")
					assert.Equal(t, 0.0, relErr)
					assertClose(t, want, productOf(a, b, tc.out, k, tc.in), 1e-6, name) // float32 factors
				})
			}
		}
	}
}

func TestSpanRankRules(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	srcs := spanSources(rng, 20, 16, 4, 6)
	three, one := 3, 1
	for _, tc := range []struct {
		name string
		o    Combine
		rank int
		want int
	}{
		{"default: the span", Combine{CombinationType: "iso_c"}, 10, 10},
		{"max_rank caps it", Combine{CombinationType: "iso_c", MaxRank: &three}, 3, 3},
		{"svd_rank", Combine{CombinationType: "tsv", SVDRank: &linalg.RankSpec{Fixed: 5}}, 5, 5},
		{"svd_rank above the span pads with zeros", Combine{CombinationType: "tsv", SVDRank: &linalg.RankSpec{Fixed: 12}}, 12, 12},
		{"energy on an isotropic spectrum", Combine{CombinationType: "iso_c", SVDRank: &linalg.RankSpec{Energy: 0.5}}, 10, 5},
		{"energy capped", Combine{CombinationType: "iso_c", SVDRank: &linalg.RankSpec{Energy: 0.5}, MaxRank: &one}, 10, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			require.NoError(t, tc.o.Validate())
			a, b, k, relErr, err := mergeSpan(srcs, &tc.o, tc.rank, 16, 20, 1, "m")
			require.NoError(t, err)
			assert.Equal(t, tc.want, k)
			assert.Len(t, a, k*16)
			assert.Len(t, b, 20*k)
			if tc.o.CombinationType == "iso_c" {
				assert.InDelta(t, math.Sqrt(float64(10-min(k, 10))/10), relErr, 1e-12)
			}
		})
	}
}

func TestSpanParamsAreValidated(t *testing.T) {
	nan, half := math.NaN(), 0.5
	err := (&Combine{CombinationType: "iso_c", Scaling: &nan}).Validate()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "scaling")
	for _, name := range []string{"svd", "cat", "task_arithmetic", "breadcrumbs"} {
		c := Combine{CombinationType: name, Scaling: &half}
		if name == "breadcrumbs" {
			c.Density = &half // it needs one; the others refuse it
		}
		err := c.Validate()
		require.Error(t, err, name)
		assert.Contains(t, err.Error(), "does not take scaling")
	}
	for _, bad := range []Combine{
		{CombinationType: "iso_c", Lambda: &half},
		{CombinationType: "tsv", Gamma: &half},
		{CombinationType: "tsv", CommonFraction: &half},
		{CombinationType: "iso_cts", CommonFraction: &nan},
	} {
		require.Error(t, bad.Validate())
	}
}

func TestSpanZeroUpdate(t *testing.T) {
	srcs := spanSources(rand.New(rand.NewPCG(7, 8)), 8, 8, 2, 2)
	srcs[0].Weight, srcs[1].Weight = 0, 0
	for _, name := range []string{"iso_c", "tsv", "iso_cts"} {
		o := Combine{CombinationType: name}
		require.NoError(t, o.Validate())
		a, b, k, relErr, err := mergeSpan(srcs, &o, 4, 8, 8, 1, "m")
		require.NoError(t, err)
		assert.Equal(t, 1, k)
		assert.Equal(t, 0.0, relErr)
		for _, v := range append(a, b...) {
			assert.Zero(t, v)
		}
	}
}

// coreMatrices is the dense reference of Core Space: U_B, V_A from dense
// SVDs of the stacked raw factors and M_t = U_B^T dW_t V_A, with dW_t =
// scale(t) B_t A_t.
func coreMatrices(t *testing.T, srcs []Source, out, in int, scale func(Source) float64) (ub, va *mat.Dense, ms []*mat.Dense) {
	total := 0
	for _, s := range srcs {
		total += s.Mod.Rank
	}
	bs := mat.NewDense(out, total, nil)
	as := mat.NewDense(total, in, nil)
	off := 0
	for _, s := range srcs {
		fa, fb, err := s.Mod.Factors()
		require.NoError(t, err)
		r := s.Mod.Rank
		bs.Slice(0, out, off, off+r).(*mat.Dense).Copy(mat.NewDense(out, r, toFloat64(fb)))
		as.Slice(off, off+r, 0, in).(*mat.Dense).Copy(mat.NewDense(r, in, toFloat64(fa)))
		off += r
	}
	ub, _, _ = thinSVD(bs)
	_, _, va = thinSVD(as)
	for _, s := range srcs {
		d := denseUpdate(t, s)
		d.Scale(scale(s)/(s.Weight*s.Mod.Scaling), d)
		var m, tmp mat.Dense
		tmp.Mul(ub.T(), d)
		m.Mul(&tmp, va)
		ms = append(ms, &m)
	}
	return ub, va, ms
}

func TestCoreSpaceMethodsMatchDenseReferences(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	half := 0.5
	for _, tc := range spanShapes {
		srcs := spanSources(rng, tc.out, tc.in, tc.ranks...)
		t.Run("core_tsv/"+tc.name, func(t *testing.T) {
			ub, va, ms := coreMatrices(t, srcs, tc.out, tc.in, func(s Source) float64 { return s.Weight * s.Mod.Scaling })
			qb, qa := ub.RawMatrix().Cols, va.RawMatrix().Cols
			mt := ms
			// TSV-M on the cores, each task keeping floor(min(qB, qA) / T) triplets
			per := min(qb, qa) / len(ms)
			var us, vs []*mat.Dense
			var ss []float64
			for _, m := range mt {
				u, sv, v := thinSVD(mat.DenseCopyOf(m))
				k := min(len(sv), per)
				us = append(us, mat.DenseCopyOf(u.Slice(0, qb, 0, k)))
				vs = append(vs, mat.DenseCopyOf(v.Slice(0, qa, 0, k)))
				ss = append(ss, sv[:k]...)
			}
			ucat, vcat := mat.NewDense(qb, len(ss), nil), mat.NewDense(qa, len(ss), nil)
			off := 0
			for i := range us {
				_, k := us[i].Dims()
				if k > 0 {
					ucat.Slice(0, qb, off, off+k).(*mat.Dense).Copy(us[i])
					vcat.Slice(0, qa, off, off+k).(*mat.Dense).Copy(vs[i])
				}
				off += k
			}
			pu, pv := polarDense(ucat), polarDense(vcat)
			for j, s := range ss {
				for i := 0; i < qb; i++ {
					pu.Set(i, j, pu.At(i, j)*s)
				}
			}
			var m, tmp, want mat.Dense
			m.Mul(pu, pv.T())
			tmp.Mul(ub, &m)
			want.Mul(&tmp, va.T())
			o := Combine{CombinationType: "core_tsv"}
			require.NoError(t, o.Validate())
			a, b, k, _, err := mergeSpan(srcs, &o, 1, tc.in, tc.out, 1, "m")
			require.NoError(t, err)
			assertClose(t, &want, productOf(a, b, tc.out, k, tc.in), 1e-6, "core_tsv")
		})
		t.Run("core_ties/"+tc.name, func(t *testing.T) {
			ub, va, ms := coreMatrices(t, srcs, tc.out, tc.in, func(s Source) float64 { return s.Mod.Scaling })
			qb, qa := ub.RawMatrix().Cols, va.RawMatrix().Cols
			tensors := make([][]float32, len(ms))
			weights := make([]float32, len(ms))
			for i, m := range ms {
				tensors[i] = ToFloat32(mat.DenseCopyOf(m).RawMatrix().Data)
				weights[i] = float32(srcs[i].Weight)
			}
			merged := comb("ties", half).Apply(tensors, weights, nil, false)
			var tmp, want mat.Dense
			tmp.Mul(ub, mat.NewDense(qb, qa, toFloat64(merged)))
			want.Mul(&tmp, va.T())
			o := Combine{CombinationType: "core_ties", Density: &half}
			require.NoError(t, o.Validate())
			a, b, k, _, err := mergeSpan(srcs, &o, 1, tc.in, tc.out, 1, "m")
			require.NoError(t, err)
			assertClose(t, &want, productOf(a, b, tc.out, k, tc.in), 1e-5, "core_ties")
		})
	}
}

func BenchmarkSpanMethods4096x4096ThreeRank16(b *testing.B) {
	srcs := spanSources(rand.New(rand.NewPCG(11, 12)), 4096, 4096, 16, 16, 16)
	half := 0.5
	for _, name := range []string{"iso_c", "tsv", "iso_cts", "core_ties", "core_tsv"} {
		b.Run(name, func(b *testing.B) {
			o := Combine{CombinationType: name}
			if name == "core_ties" {
				o.Density = &half
			}
			require.NoError(b, o.Validate())
			for b.Loop() {
				if _, _, _, _, err := mergeSpan(srcs, &o, 48, 4096, 4096, 1, "m"); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
}

func TestSpanMethodsOnDuplicateAdapters(t *testing.T) {
	// the same adapter twice: the stacks are rank-deficient; every direction and value comes from the adapter
	srcs := spanSources(rand.New(rand.NewPCG(13, 14)), 20, 12, 3)
	srcs = append(srcs, srcs[0])
	srcs[1].Index = 1
	dw := denseUpdate(t, srcs[0])
	_, s, _ := thinSVD(mat.DenseCopyOf(dw))
	mean := (s[0] + s[1] + s[2]) / 3
	for _, tc := range []struct {
		name string
		want func() *mat.Dense
	}{
		{"tsv", func() *mat.Dense { return dw }}, // polar([U U]) diag(S, S) polar([V V])^T = U S V^T
		{"iso_c", func() *mat.Dense { return isoCDense(t, srcs[:1], 20, 12, 2) }},
		{"iso_cts", func() *mat.Dense {
			u, _, v := thinSVD(mat.DenseCopyOf(dw))
			var d mat.Dense
			d.Mul(u, v.T())
			d.Scale(2*mean, &d) // all three directions are common; their values are those of the sum, 2 S
			return &d
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			o := Combine{CombinationType: tc.name}
			require.NoError(t, o.Validate())
			a, b, k, _, err := mergeSpan(srcs, &o, 6, 12, 20, 1, "m")
			require.NoError(t, err)
			assert.Equal(t, 3, k)
			assertClose(t, tc.want(), productOf(a, b, 20, k, 12), 1e-6, tc.name)
		})
	}
}
