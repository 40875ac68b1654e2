package methods

import (
	"math"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
)

// DefaultCommonFraction is Iso-CTS's default share of the common subspace.
const DefaultCommonFraction = 0.8

// isoCTS is Iso-CTS (Marczak et al., ICML 2025) on adapters. With q the
// rank of the summed update (its nonzero singular values: sum r_t unless
// the adapters' spans overlap or exceed a side) in place of the reference's
// min(m, n), and T the adapters of the module: the common subspace is the
// top k_c = q - T round((q - floor(f q)) / T) directions of the sum (f =
// common_fraction, rounding half to even as Python's round; k_c >= 0);
// each task adds the top n = floor((q - k_c) / T) directions of its update
// with the common subspace projected out, at most its nonzero ones; the
// stacked U's and V's are orthogonalised by their polar factors and every
// kept direction gets the mean of the kept singular values, times scaling.
// The common directions come first, so svd_rank keeps them first.
func isoCTS(sp *span, scaling, fraction float64) (l, s, rt []float64) {
	u, sv, vt := coreSVD(sp.sum(), sp.pb, sp.pa)
	qf := len(sv)
	q := numericalRank(sv, sp.m, sp.n)
	t := len(sp.cores)
	kc := int(math.Floor(float64(q) * fraction))
	kc = max(0, q-int(math.RoundToEven(float64(q-kc)/float64(t)))*t)
	per := (q - kc) / t
	var us, vts [][]float64
	var ss []float64
	keep := func(u []float64, cols int, s []float64, vt []float64, k int) {
		for j := 0; j < k; j++ {
			col := make([]float64, sp.pb)
			for i := range col {
				col[i] = u[i*cols+j]
			}
			us = append(us, col)
			vts = append(vts, vt[j*sp.pa:(j+1)*sp.pa])
			ss = append(ss, s[j])
		}
	}
	keep(u, qf, sv, vt, kc)
	uc := truncCols(u, sp.pb, qf, kc) // pb x kc
	for _, c := range sp.cores {
		ts := append([]float64(nil), c...)
		if kc > 0 { // c - Uc (Uc^T c)
			proj := make([]float64, kc*sp.pa)
			blas64.Gemm(blas.Trans, blas.NoTrans, 1,
				blas64.General{Rows: sp.pb, Cols: kc, Stride: kc, Data: uc},
				blas64.General{Rows: sp.pb, Cols: sp.pa, Stride: sp.pa, Data: c},
				0, blas64.General{Rows: kc, Cols: sp.pa, Stride: sp.pa, Data: proj})
			blas64.Gemm(blas.NoTrans, blas.NoTrans, -1,
				blas64.General{Rows: sp.pb, Cols: kc, Stride: kc, Data: uc},
				blas64.General{Rows: kc, Cols: sp.pa, Stride: sp.pa, Data: proj},
				1, blas64.General{Rows: sp.pb, Cols: sp.pa, Stride: sp.pa, Data: ts})
		}
		ut, st, vtt := coreSVD(ts, sp.pb, sp.pa)
		// the residual's rank, against the tolerance of the task's own update
		_, s0, _ := coreSVD(c, sp.pb, sp.pa)
		k := 0
		if len(s0) > 0 && s0[0] > 0 {
			tol := s0[0] * float64(max(sp.m, sp.n)) * 0x1p-52
			for k < min(per, len(st)) && st[k] > tol {
				k++
			}
		}
		keep(ut, len(st), st, vtt, k)
	}
	kt := len(ss)
	if kt == 0 {
		return nil, nil, nil
	}
	mean := 0.0
	for _, v := range ss {
		mean += v
	}
	mean = mean / float64(kt) * scaling
	ucat := make([]float64, sp.pb*kt)
	vcat := make([]float64, kt*sp.pa)
	for j := range ss {
		for i := 0; i < sp.pb; i++ {
			ucat[i*kt+j] = us[j][i]
		}
		copy(vcat[j*sp.pa:(j+1)*sp.pa], vts[j])
	}
	s = make([]float64, kt)
	for i := range s {
		s[i] = mean
	}
	// kt <= q <= min(pb, pa): with stacks of full rank the polar factors have orthonormal columns / rows and
	// this is an SVD of D, in the stacking order; otherwise D is factorised again
	pu, fu := polar(ucat, sp.pb, kt, sp.m, sp.n)
	pv, fv := polar(vcat, kt, sp.pa, sp.m, sp.n)
	if fu && fv {
		return pu, s, pv
	}
	for i := 0; i < sp.pb; i++ {
		for j := 0; j < kt; j++ {
			pu[i*kt+j] *= mean
		}
	}
	d := make([]float64, sp.pb*sp.pa)
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1,
		blas64.General{Rows: sp.pb, Cols: kt, Stride: kt, Data: pu},
		blas64.General{Rows: kt, Cols: sp.pa, Stride: sp.pa, Data: pv},
		0, blas64.General{Rows: sp.pb, Cols: sp.pa, Stride: sp.pa, Data: d})
	return nonzeroSVD(d, sp)
}
