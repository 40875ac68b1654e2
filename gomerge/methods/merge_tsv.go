package methods

import (
	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
)

// tsvM is TSV-M (Gargiulo et al., CVPR 2025) on adapters: each task's
// update c_t B_t A_t = U_t S_t V_t^T (exact, from its core), of which the
// top k_t = min(rank_t, floor(min(m, n) / T)) triplets are kept (rank_t:
// its nonzero singular values, r_t for a full-rank adapter, so every
// direction an adapter has unless T r_t > min(m, n)); the kept U's and V's
// are stacked and orthogonalised by their polar factors, and D = scaling *
// U_perp diag(S) V_perp^T. The reference keeps floor(min(m, n) / T)
// triplets of a dense SVD, whose vectors beyond rank_t are an arbitrary
// basis of the null space with zero singular values: they add nothing to D
// but rotate the polar factors, so on adapters they are left out.
func tsvM(sp *span, scaling float64) (l, s, rt []float64) {
	d := tsvCombine(sp.cores, sp.pb, sp.pa, min(sp.m, sp.n)/len(sp.cores), sp.m, sp.n, scaling)
	if d == nil {
		return nil, nil, nil
	}
	return nonzeroSVD(d, sp)
}

// tsvCombine is TSV-M on task matrices given as rows x cols cores of m x n
// updates: each core's top min(its nonzero, per) triplets, stacked, the
// polar factors of the stacks, scaling * U_perp diag(S) V_perp^T (rows x
// cols; nil when no task has a nonzero direction).
func tsvCombine(cores [][]float64, rows, cols, per, m, n int, scaling float64) []float64 {
	var us, vts [][]float64
	var ss []float64
	for _, c := range cores {
		u, sv, vt := coreSVD(c, rows, cols)
		q := len(sv)
		k := min(numericalRank(sv, m, n), per)
		for j := 0; j < k; j++ {
			col := make([]float64, rows)
			for i := range col {
				col[i] = u[i*q+j]
			}
			us = append(us, col)
			vts = append(vts, vt[j*cols:(j+1)*cols])
			ss = append(ss, sv[j])
		}
	}
	kt := len(ss)
	if kt == 0 {
		return nil
	}
	ucat := make([]float64, rows*kt) // rows x K
	vcat := make([]float64, kt*cols) // K x cols
	for j := range ss {
		for i := 0; i < rows; i++ {
			ucat[i*kt+j] = us[j][i]
		}
		copy(vcat[j*cols:(j+1)*cols], vts[j])
	}
	pu, _ := polar(ucat, rows, kt, m, n)
	pv, _ := polar(vcat, kt, cols, m, n)
	for i := 0; i < rows; i++ {
		for j := range ss {
			pu[i*kt+j] *= ss[j] * scaling
		}
	}
	d := make([]float64, rows*cols)
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1,
		blas64.General{Rows: rows, Cols: kt, Stride: kt, Data: pu},
		blas64.General{Rows: kt, Cols: cols, Stride: cols, Data: pv},
		0, blas64.General{Rows: rows, Cols: cols, Stride: cols, Data: d})
	return d
}

// nonzeroSVD is the core SVD of a merged core d (pb x pa), restricted to its
// nonzero singular values.
func nonzeroSVD(d []float64, sp *span) (l, s, rt []float64) {
	u, sv, vt := coreSVD(d, sp.pb, sp.pa)
	q := numericalRank(sv, sp.m, sp.n)
	return truncCols(u, sp.pb, len(sv), q), sv[:q], vt[:q*sp.pa]
}
