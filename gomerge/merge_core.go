package gomerge

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

// coreTIES is core_ties: PEFT's TIES (magnitude pruning to density, sign
// election, disjoint mean, with the weights w_t) of the core matrices of
// s_t B_t A_t, as ties_svd treats the dense updates; D = scaling * U_B M V_A.
func coreTIES(sp *span, o spanOptions) (l, s, rt []float64) {
	if o.comb == nil {
		return nil, nil, nil
	}
	cs := newCoreSpace(sp)
	ms := make([][]float32, len(sp.cores))
	weights := make([]float32, len(sp.cores))
	for t := range sp.cores {
		ms[t] = toFloat32(cs.matrix(sp.core(t, sp.scalings[t])))
		weights[t] = float32(sp.weights[t])
	}
	merged := o.comb.Apply(ms, weights, nil, true)
	m := make([]float64, len(merged))
	for i, v := range merged {
		m[i] = float64(v) * o.scaling
	}
	return nonzeroSVD(cs.back(m), sp)
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
