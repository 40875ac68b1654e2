package methods

import (
	"context"
	"gomerge/gomerge/linalg"
	"math"
	"strconv"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
	"gonum.org/v1/gonum/lapack"
	"gonum.org/v1/gonum/lapack/lapack64"
)

// FamilySpan merges in the span of the stacked factors (span.go): every
// update dW_t = c_t B_t A_t (c_t = w_t s_t) of a module is Qb C_t Qa^T
// exactly, with Qb (m x pb) and Qa (n x pa) the thin Q factors of the
// stacked [B_1 | ... | B_T] and [A_1; ...; A_T]^T and C_t a small
// pb x pa core; a method combines the cores, and its result Qb D Qa^T is
// factorised from an SVD of D. Cost O((m + n) R^2 + R^3), R = sum r_t.
const FamilySpan Family = "span"

// RankSpan: svd_rank (a rank or the energy rule, capped by max_rank), by
// default the rank of the method's merged update (its singular values
// above the numerical tolerance), per module.
var RankSpan = &RankRule{Name: "svd_rank|span", adapter: svdRankOr(sumOf), exact: true, spectral: true}

// DefaultScaling is the default scale of the span methods' merged update.
const DefaultScaling = 1.0

// span is a module's updates in the span of their stacked factors.
type span struct {
	m, n   int       // out, in
	pb, pa int       // columns of qb and qa
	qb     []float64 // m x pb, orthonormal columns
	qa     []float64 // n x pa, orthonormal columns
	cores  [][]float64
	ranks  []int // r_t
	// the R factors of the two QRs (pb x R, pa x R) and each source's
	// weight w_t and scaling s_t, for the core space's bases and weights
	rb, ra            []float64
	total             int // R
	weights, scalings []float64
}

// newSpan builds the span of the sources' factors: cores[t] = c_t Rb_t Ra_t^T,
// where Rb_t and Ra_t are the columns of source t in the R factors of the
// two thin QRs, so that c_t B_t A_t = qb cores[t] qa^T exactly (c_t = w_t s_t).
func newSpan(srcs []Source, in, out int) (*span, error) {
	total := 0
	for _, s := range srcs {
		total += s.Mod.Rank
	}
	bc := make([]float64, out*total) // [B_1 | B_2 | ...]
	at := make([]float64, in*total)  // [A_1; A_2; ...]^T
	sp := &span{m: out, n: in, ranks: make([]int, len(srcs))}
	off := 0
	for t, s := range srcs {
		fa, fb, err := s.Mod.Factors()
		if err != nil {
			return nil, err
		}
		r := s.Mod.Rank
		for i := 0; i < out; i++ {
			for j, v := range fb[i*r : (i+1)*r] {
				bc[i*total+off+j] = float64(v)
			}
		}
		for k := 0; k < r; k++ {
			for j, v := range fa[k*in : (k+1)*in] {
				at[j*total+off+k] = float64(v)
			}
		}
		sp.ranks[t] = r
		sp.weights = append(sp.weights, s.Weight)
		sp.scalings = append(sp.scalings, s.Mod.Scaling)
		off += r
	}
	var rb, ra []float64
	sp.qb, rb, sp.pb = linalg.ThinQR(bc, out, total)
	sp.qa, ra, sp.pa = linalg.ThinQR(at, in, total)
	sp.rb, sp.ra, sp.total = rb, ra, total
	for t := range sp.ranks {
		sp.cores = append(sp.cores, sp.core(t, sp.weights[t]*sp.scalings[t]))
	}
	return sp, nil
}

// core is c Rb_t Ra_t^T, the core of c B_t A_t.
func (sp *span) core(t int, c float64) []float64 {
	off, total := 0, sp.total
	for _, r := range sp.ranks[:t] {
		off += r
	}
	r := sp.ranks[t]
	core := make([]float64, sp.pb*sp.pa)
	if r > 0 && sp.pb > 0 && sp.pa > 0 {
		blas64.Gemm(blas.NoTrans, blas.Trans, c,
			blas64.General{Rows: sp.pb, Cols: r, Stride: total, Data: sp.rb[off:]},
			blas64.General{Rows: sp.pa, Cols: r, Stride: total, Data: sp.ra[off:]},
			0, blas64.General{Rows: sp.pb, Cols: sp.pa, Stride: sp.pa, Data: core})
	}
	return core
}

// sum is sum_t cores[t]: the core of sum_t c_t B_t A_t.
func (sp *span) sum() []float64 {
	out := make([]float64, sp.pb*sp.pa)
	for _, c := range sp.cores {
		for i, v := range c {
			out[i] += v
		}
	}
	return out
}

// dense is qb x qa^T, the m x n update of a core (for tests).
func (sp *span) dense(x []float64) []float64 {
	return sandwich(sp.qb, false, sp.m, sp.pb, x, sp.pa, sp.qa, false, sp.n)
}

// sandwich returns L X R^T for a rows x k matrix L (or L^T when transL:
// then l is stored k x rows), a k x j matrix X and a cols x j matrix R (or
// R^T when transR: r stored j x cols), all row-major: the change of basis
// that every span and core-space method applies to a small core.
func sandwich(l []float64, transL bool, rows, k int, x []float64, j int, r []float64, transR bool, cols int) []float64 {
	lg := blas64.General{Rows: rows, Cols: k, Stride: k, Data: l}
	lt := blas.NoTrans
	if transL {
		lg, lt = blas64.General{Rows: k, Cols: rows, Stride: rows, Data: l}, blas.Trans
	}
	t := make([]float64, rows*j)
	blas64.Gemm(lt, blas.NoTrans, 1, lg, blas64.General{Rows: k, Cols: j, Stride: j, Data: x},
		0, blas64.General{Rows: rows, Cols: j, Stride: j, Data: t})
	rg, rt := blas64.General{Rows: cols, Cols: j, Stride: j, Data: r}, blas.Trans
	if transR {
		rg, rt = blas64.General{Rows: j, Cols: cols, Stride: cols, Data: r}, blas.NoTrans
	}
	out := make([]float64, rows*cols)
	blas64.Gemm(blas.NoTrans, rt, 1, blas64.General{Rows: rows, Cols: j, Stride: j, Data: t}, rg,
		0, blas64.General{Rows: rows, Cols: cols, Stride: cols, Data: out})
	return out
}

// coreSVD is the thin SVD x = U diag(S) Vt of a small rows x cols matrix:
// U rows x q, S q (decreasing), Vt q x cols, q = min(rows, cols).
func coreSVD(x []float64, rows, cols int) (u, s, vt []float64) {
	q := min(rows, cols)
	if q == 0 {
		return nil, nil, nil
	}
	a := blas64.General{Rows: rows, Cols: cols, Stride: cols, Data: append([]float64(nil), x...)}
	s = make([]float64, q)
	ug := blas64.General{Rows: rows, Cols: q, Stride: q, Data: make([]float64, rows*q)}
	vg := blas64.General{Rows: q, Cols: cols, Stride: cols, Data: make([]float64, q*cols)}
	work := []float64{0}
	lapack64.Gesvd(lapack.SVDStore, lapack.SVDStore, a, ug, vg, s, work, -1)
	work = make([]float64, int(work[0]))
	if ok := lapack64.Gesvd(lapack.SVDStore, lapack.SVDStore, a, ug, vg, s, work, len(work)); !ok {
		panic("gomerge: SVD of a core matrix did not converge")
	}
	return ug.Data, s, vg.Data
}

// numericalRank is the number of singular values (decreasing) above
// numpy.linalg.matrix_rank's tolerance s_0 * max(m, n) * eps (float64) for
// an m x n matrix: the directions an adapter's update really has.
func numericalRank(s []float64, m, n int) int {
	if len(s) == 0 || s[0] == 0 {
		return 0
	}
	tol := s[0] * float64(max(m, n)) * 0x1p-52
	k := 0
	for k < len(s) && s[k] > tol {
		k++
	}
	return k
}

// polar is the orthogonal polar factor P Q^T of the rows x cols matrix x =
// P diag(S) Q^T (thin SVD): the nearest matrix with orthonormal columns (or
// rows, when rows < cols), as TSV-M orthogonalises its stacked vectors.
// Only the pairs of nonzero singular values are kept (numerical rank, as
// numericalRank for an m x n update): for a rank-deficient stack (two tasks
// sharing a direction) the full polar factor would add arbitrary
// directions, this partial isometry adds none. full reports whether x had
// full rank min(rows, cols).
func polar(x []float64, rows, cols, m, n int) (p []float64, full bool) {
	u, s, vt := coreSVD(x, rows, cols)
	q := len(s)
	out := make([]float64, rows*cols)
	if q == 0 {
		return out, true
	}
	k := numericalRank(s, m, n)
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1,
		blas64.General{Rows: rows, Cols: k, Stride: q, Data: u},
		blas64.General{Rows: k, Cols: cols, Stride: cols, Data: vt},
		0, blas64.General{Rows: rows, Cols: cols, Stride: cols, Data: out})
	return out, k == q
}

// factors writes the update qb L diag(s) Rt qa^T, given by its core SVD
// (L pb x q with orthonormal columns, s decreasing, Rt q x pa), as the
// adapter factors truncated to rank k: B' = qb L[:, :k] diag(s[:k]) (m x k)
// and A' = Rt[:k] qa^T (k x n); components beyond q are zero. The left
// vectors get the canonical sign of LowRankSVD.
func (sp *span) factors(l, s, rt []float64, k int) (bk, ak []float64) {
	q := len(s)
	kk := min(k, q)
	bk = make([]float64, sp.m*k)
	ak = make([]float64, k*sp.n)
	if kk == 0 {
		return bk, ak
	}
	ls := make([]float64, sp.pb*kk)
	for i := 0; i < sp.pb; i++ {
		for j := 0; j < kk; j++ {
			ls[i*kk+j] = l[i*q+j] * s[j]
		}
	}
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1,
		blas64.General{Rows: sp.m, Cols: sp.pb, Stride: sp.pb, Data: sp.qb},
		blas64.General{Rows: sp.pb, Cols: kk, Stride: kk, Data: ls},
		0, blas64.General{Rows: sp.m, Cols: kk, Stride: k, Data: bk})
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: kk, Cols: sp.pa, Stride: sp.pa, Data: rt},
		blas64.General{Rows: sp.n, Cols: sp.pa, Stride: sp.pa, Data: sp.qa},
		0, blas64.General{Rows: kk, Cols: sp.n, Stride: sp.n, Data: ak})
	for j := 0; j < kk; j++ {
		best, sign := 0.0, 1.0
		for i := 0; i < sp.m; i++ {
			if v := math.Abs(bk[i*k+j]); v > best {
				best, sign = v, math.Copysign(1, bk[i*k+j])
			}
		}
		if sign < 0 {
			for i := 0; i < sp.m; i++ {
				bk[i*k+j] = -bk[i*k+j]
			}
			for i := j * sp.n; i < (j+1)*sp.n; i++ {
				ak[i] = -ak[i]
			}
		}
	}
	return bk, ak
}

// spanModule is the merge of a span method's rows.
func spanModule(fn spanMethod) mergeFunc {
	return func(_ context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
		a, b, k, relErr, err := mergeInSpan(fn, j.Srcs, c, rank, j.In, j.Out, c.seed(), j.Name)
		return moduleOutput{a: a, b: b, rank: k, relErr: relErr}, err
	}
}

// spanMethod combines a module's span into the core SVD of its merged
// update, D = basis.qb L diag(s) Rt basis.qa^T, keeping only D's nonzero
// directions. basis is sp itself for the methods whose result stays in the
// span of the A's; KnOTS, whose pruning works on the rows of V^T, gives the
// span with a new right basis (withRight).
type spanMethod func(sp *span, o spanOptions) (basis *span, l, s, rt []float64)

// inSpan is a spanMethod whose result is in the span of the factors.
func inSpan(f func(sp *span, o spanOptions) (l, s, rt []float64)) spanMethod {
	return func(sp *span, o spanOptions) (*span, []float64, []float64, []float64) {
		l, s, rt := f(sp, o)
		return sp, l, s, rt
	}
}

// The span methods' combinations of the span, for their rows.
func isoCSpan(sp *span, o spanOptions) (l, s, rt []float64) { return isoC(sp, o.scaling) }
func tsvSpan(sp *span, o spanOptions) (l, s, rt []float64)  { return tsvM(sp, o.scaling) }
func isoCTSSpan(sp *span, o spanOptions) (l, s, rt []float64) {
	return isoCTS(sp, o.scaling, o.commonFraction)
}

// spanOptions are the span methods' resolved parameters.
type spanOptions struct {
	scaling, commonFraction float64
	// comb is the element-wise merge of the Core Space and KnOTS methods
	// (PEFT's ties, dare_ties or magnitude_prune); nil for the others
	comb *Combination
	// seed and module seed the DARE masks of core_dare_ties and
	// knots_dare_ties, as DARE's are seeded (TensorSource)
	seed   uint64
	module string
}

// spanOptions resolves the options of a span method for one module.
func (o *Combine) spanOptions(seed uint64, module string) spanOptions {
	so := spanOptions{scaling: DefaultScaling, commonFraction: DefaultCommonFraction, seed: seed, module: module}
	if o.Scaling != nil {
		so.scaling = *o.Scaling
	}
	if o.CommonFraction != nil {
		so.commonFraction = *o.CommonFraction
	}
	if o.method.NeedsDensity() && o.Density != nil {
		comb := o.combination()
		so.comb = &comb
	}
	return so
}

// dare returns Combination.Apply's DARE hook for the element-wise merge of
// a span method: a Bernoulli(density) mask on task t's matrix, kept values
// divided by density, drawn from the module's seeded stream (nil when the
// method draws no masks).
func (o spanOptions) dare(label string) func(t int, x []float32) {
	if o.comb == nil || o.comb.Pruning != PruneDARE {
		return nil
	}
	return func(t int, x []float32) {
		RandomPrune(x, o.comb.Density, true, TensorSource(o.seed, o.module, label+"/"+strconv.Itoa(t)))
	}
}

// mergeInSpan runs a span method on one module: the span of its factors, the
// method's core SVD, then the factors at the rank the rule gives (by
// default the number of nonzero singular values of the merged update, at
// most max_rank). relErr is the relative Frobenius error of that
// truncation against the method's merged update.
func mergeInSpan(fn spanMethod, srcs []Source, o *Combine, rank int, in, out int, seed uint64, module string) (a, b []float32, k int, relErr float64, err error) {
	sp, err := newSpan(srcs, in, out)
	if err != nil {
		return nil, nil, 0, 0, err
	}
	basis, l, s, rt := fn(sp, o.spanOptions(seed, module))
	switch {
	case o.SVDRank != nil && o.SVDRank.Energy > 0:
		k = o.rankRule(rank).Choose(s)
		k = min(k, len(s)) // choose gives at least 1: a zero update keeps rank 1 (zeros)
	case o.SVDRank != nil:
		k = rank
	default:
		k = len(s)
		if o.MaxRank != nil {
			k = min(k, *o.MaxRank)
		}
	}
	k = max(k, 1) // PEFT cannot load a rank-0 module: a zero update is written as rank 1, zeros
	bk, ak := basis.factors(l, s, rt, k)
	return ToFloat32(ak), ToFloat32(bk), k, linalg.TruncationError(s, k), nil
}

// isoC is Iso-C (Marczak et al., ICML 2025) on adapters: the SVD of the
// summed update U S V^T, restricted to its nonzero singular values, with
// the spectrum replaced by its mean times scaling.
func isoC(sp *span, scaling float64) (l, s, rt []float64) {
	u, sv, vt := coreSVD(sp.sum(), sp.pb, sp.pa)
	q := numericalRank(sv, sp.m, sp.n)
	mean := 0.0
	for _, v := range sv[:q] {
		mean += v
	}
	if q > 0 {
		mean = mean / float64(q) * scaling
	}
	s = make([]float64, q)
	for i := range s {
		s[i] = mean
	}
	return truncCols(u, sp.pb, len(sv), q), s, vt[:q*sp.pa]
}

// truncCols keeps the first k of the cols columns of a rows x cols matrix.
func truncCols(x []float64, rows, cols, k int) []float64 {
	out := make([]float64, rows*k)
	for i := 0; i < rows; i++ {
		copy(out[i*k:(i+1)*k], x[i*cols:i*cols+k])
	}
	return out
}
