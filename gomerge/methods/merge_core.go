package methods

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
)

// coreSpace is Core Space (Panariello et al., NeurIPS 2025): U_B, the left
// singular basis of the stacked [B_1 | ... | B_T] (m x qB), and V_A, the
// right singular basis of the stacked [A_1; ...; A_T] (n x qA), both
// restricted to their nonzero singular values; a task's core matrix is
// M_t = U_B^T dW_t V_A (qB x qA). With the span's thin QRs [B_t] = Qb Rb
// and [A_t]^T = Qa Ra, U_B = Qb P and V_A = Qa P' for P, P' the left
// singular vectors of Rb and Ra, so M_t = P^T core_t P' and a merged core M
// is the update Qb (P M P'^T) Qa^T: everything is R x R.
type coreSpace struct {
	sp     *span
	p, pp  []float64 // pb x qb, pa x qa
	qb, qa int
}

func newCoreSpace(sp *span) *coreSpace {
	cs := &coreSpace{sp: sp}
	u, s, _ := coreSVD(sp.rb, sp.pb, sp.total)
	cs.qb = numericalRank(s, sp.m, sp.total)
	cs.p = truncCols(u, sp.pb, len(s), cs.qb)
	u, s, _ = coreSVD(sp.ra, sp.pa, sp.total)
	cs.qa = numericalRank(s, sp.n, sp.total)
	cs.pp = truncCols(u, sp.pa, len(s), cs.qa)
	return cs
}

// matrix is M = P^T x P' (qb x qa) of a span core x (pb x pa).
func (cs *coreSpace) matrix(x []float64) []float64 {
	// P is stored pb x qb and P' pa x qa: both enter transposed
	return sandwich(cs.p, true, cs.qb, cs.sp.pb, x, cs.sp.pa, cs.pp, true, cs.qa)
}

// back is the span core P M P'^T (pb x pa) of a merged core matrix M.
func (cs *coreSpace) back(m []float64) []float64 {
	return sandwich(cs.p, false, cs.sp.pb, cs.qb, m, cs.qa, cs.pp, false, cs.sp.pa)
}

// coreCombine is core_ties and core_dare_ties: PEFT's ties or dare_ties
// (magnitude pruning to density, or DARE's masks with kept values divided
// by density; then sign election and disjoint mean, with the weights w_t)
// of the core matrices of s_t B_t A_t, as ties_svd and dare_ties_svd treat
// the dense updates; D = scaling * U_B M V_A^T.
func coreCombine(sp *span, o spanOptions) (l, s, rt []float64) {
	if o.comb == nil {
		return nil, nil, nil
	}
	cs := newCoreSpace(sp)
	ms := make([][]float32, len(sp.cores))
	weights := make([]float32, len(sp.cores))
	for t := range sp.cores {
		ms[t] = ToFloat32(cs.matrix(sp.core(t, sp.scalings[t])))
		weights[t] = float32(sp.weights[t])
	}
	merged := o.comb.Apply(ms, weights, o.dare("core"), true)
	m := make([]float64, len(merged))
	for i, v := range merged {
		m[i] = float64(v) * o.scaling
	}
	return nonzeroSVD(cs.back(m), sp)
}

// coreIsoC is core_iso_c: Iso-C inside Core Space, as the reference
// isotropizes a merged core (core-space-merging's isotropize_matrix): the
// SVD of the summed core matrix M = sum_t M_t of c_t B_t A_t (qB x qA),
// whose singular values are replaced by their mean over all min(qB, qA)
// of them, zeros included, times scaling. Where M has full rank (adapters
// whose spans do not overlap: the generic case) this is iso_c. Where it
// has less, the mean counts the zeros, but D keeps only M's nonzero
// directions: the reference's U V^T on the null space is not defined (any
// rotation of its left and right null vectors is an SVD).
func coreIsoC(sp *span, o spanOptions) (l, s, rt []float64) {
	cs := newCoreSpace(sp)
	u, sv, vt := coreSVD(cs.matrix(sp.sum()), cs.qb, cs.qa)
	if len(sv) == 0 {
		return nil, nil, nil
	}
	mean := 0.0
	for _, v := range sv {
		mean += v
	}
	mean = mean / float64(len(sv)) * o.scaling
	q, k := len(sv), numericalRank(sv, sp.m, sp.n) // u is qb x q, vt q x qa
	d := make([]float64, cs.qb*cs.qa)
	blas64.Gemm(blas.NoTrans, blas.NoTrans, mean,
		blas64.General{Rows: cs.qb, Cols: k, Stride: q, Data: u},
		blas64.General{Rows: k, Cols: cs.qa, Stride: cs.qa, Data: vt},
		0, blas64.General{Rows: cs.qb, Cols: cs.qa, Stride: cs.qa, Data: d})
	return nonzeroSVD(cs.back(d), sp)
}

// coreTSV is core_tsv: TSV-M on the core matrices M_t of c_t B_t A_t, with
// the reference's share of each task, floor(min(qB, qA) / T) triplets (a
// fraction of the span's dimension, at most the task's nonzero ones).
func coreTSV(sp *span, o spanOptions) (l, s, rt []float64) {
	cs := newCoreSpace(sp)
	ms := make([][]float64, len(sp.cores))
	for t, c := range sp.cores {
		ms[t] = cs.matrix(c)
	}
	d := tsvCombine(ms, cs.qb, cs.qa, min(cs.qb, cs.qa)/len(ms), sp.m, sp.n, o.scaling)
	if d == nil {
		return nil, nil, nil
	}
	return nonzeroSVD(cs.back(d), sp)
}
