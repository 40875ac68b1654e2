package methods

import (
	"gomerge/gomerge/linalg"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
)

// knots is KnOTS (Stoica et al., ICLR 2025; gstoica27/KnOTS,
// task_merger.py SVDMerger): the SVD of the concatenated updates
// [dW_1 ... dW_T] = U diag(S) [V_1^T ... V_T^T] (dW_t = s_t B_t A_t, m x n
// each, concatenated along the input), restricted to its nonzero singular
// values, aligns the tasks in one basis U; each task is represented by
// X_t = diag(S) V_t^T (k x n), the X_t are merged element-wise with
// knots_ties: PEFT's ties (magnitude pruning of each X_t to density, the
// weights w_t, sign election, disjoint mean), knots_dare_ties: PEFT's
// dare_ties (DARE's masks with kept values divided by density, sign
// election, disjoint mean) or knots_linear: PEFT's magnitude_prune
// (pruning, then the weighted sum), and D = scaling * U X. The pruning is
// per module (the reference flattens the whole model into one vector).
//
// Exactly, from the span: dW_t = Qb C_t Qa^T with one Qa for every task, so
// [dW_1 ... dW_T] = Qb [C_1 ... C_T] blockdiag(Qa^T), and the SVD of the
// pb x (T pa) matrix [C_1 ... C_T] = P diag(S) [Y_1^T ... Y_T^T] gives
// U = Qb P and V_t^T = Y_t^T Qa^T. The merged X leaves the span of the A's
// (pruning works on its entries), so D = Qb (P R^T) Qm^T is factorised
// from a thin QR X^T = Qm R: O((m + n) R^2), no dense SVD.
func knots(sp *span, o spanOptions) (*span, []float64, []float64, []float64) {
	t := len(sp.cores)
	if o.comb == nil || t == 0 || sp.pb == 0 || sp.pa == 0 {
		return sp, nil, nil, nil
	}
	w := t * sp.pa
	cat := make([]float64, sp.pb*w) // [C_1 ... C_T], unweighted: the weights enter the merge
	for i := range sp.cores {
		c := sp.core(i, sp.scalings[i])
		for r := 0; r < sp.pb; r++ {
			copy(cat[r*w+i*sp.pa:r*w+(i+1)*sp.pa], c[r*sp.pa:(r+1)*sp.pa])
		}
	}
	p, s, yt := coreSVD(cat, sp.pb, w)
	q := len(s)
	k := numericalRank(s, sp.m, sp.n*t)
	if k == 0 {
		return sp, nil, nil, nil
	}
	xs := make([][]float32, t)
	weights := make([]float32, t)
	for i := range xs {
		sy := make([]float64, k*sp.pa) // diag(S) Y_t^T, k x pa
		for r := 0; r < k; r++ {
			for j := 0; j < sp.pa; j++ {
				sy[r*sp.pa+j] = s[r] * yt[r*w+i*sp.pa+j]
			}
		}
		x := make([]float64, k*sp.n) // X_t = diag(S) Y_t^T Qa^T
		blas64.Gemm(blas.NoTrans, blas.Trans, 1,
			blas64.General{Rows: k, Cols: sp.pa, Stride: sp.pa, Data: sy},
			blas64.General{Rows: sp.n, Cols: sp.pa, Stride: sp.pa, Data: sp.qa},
			0, blas64.General{Rows: k, Cols: sp.n, Stride: sp.n, Data: x})
		xs[i] = ToFloat32(x)
		weights[i] = float32(sp.weights[i])
	}
	merged := o.comb.Apply(xs, weights, o.dare("knots"), true) // k x n
	xt := make([]float64, sp.n*k)                              // (scaling X)^T
	for r := 0; r < k; r++ {
		for j := 0; j < sp.n; j++ {
			xt[j*k+r] = float64(merged[r*sp.n+j]) * o.scaling
		}
	}
	qm, rm, pm := linalg.ThinQR(xt, sp.n, k) // n x pm, pm x k
	core := make([]float64, sp.pb*pm)        // P_k R^T
	blas64.Gemm(blas.NoTrans, blas.Trans, 1,
		blas64.General{Rows: sp.pb, Cols: k, Stride: q, Data: p},
		blas64.General{Rows: pm, Cols: k, Stride: k, Data: rm},
		0, blas64.General{Rows: sp.pb, Cols: pm, Stride: pm, Data: core})
	basis := sp.withRight(qm, pm)
	l, sv, rt := nonzeroSVD(core, basis)
	return basis, l, sv, rt
}

// withRight is the span with another right basis qa (n x pa, orthonormal
// columns) in place of the A's: for an update that leaves their span.
func (sp *span) withRight(qa []float64, pa int) *span {
	b := *sp
	b.qa, b.pa = qa, pa
	return &b
}
