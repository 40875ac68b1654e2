package methods

import (
	"context"
	"math"
	"sort"

	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/linalg"
)

// svdModule is the merge of "svd": the exact truncated SVD of the weighted
// sum, at the rank the options give.
func svdModule(_ context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
	a, b, k, relErr, err := mergeSVD(c.weighted(j.Srcs), c.rankRule(rank), j.In, j.Out, c.SVDClamp)
	return moduleOutput{a: a, b: b, rank: k, relErr: relErr}, err
}

// mergeSVD is PEFT's "svd" combination: the rank-k truncated SVD of
// D = sum_i w_i s_i B_i A_i. D has rank at most R = sum r_i, so its SVD is
// computed exactly from the stacked factors (see LowRankSVD) instead of a
// dense SVD of the out x in matrix. B' = U_k S_k, A' = V_k^T. The rule
// gives k (fixed, or from the spectrum); relErr is the exact relative
// Frobenius error of the truncation, before any clamp.
func mergeSVD(srcs []Source, rule linalg.RankRule, in, out int, clamp *float64) (a, b []float32, k int, relErr float64, err error) {
	total := 0
	for _, s := range srcs {
		total += s.Mod.Rank
	}
	// the stacks are scratch (LowRankSVDBy may overwrite them) and written whole below: pooled where small
	// (pool.Get64), not cleared
	bc := pool.Get64(out * total) // [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]
	ac := pool.Get64(total * in)  // [A_1; A_2; ...]
	// the pooled ones go back after the SVD; a large stack is not named after the call, so that the collector
	// may free it once the SVD is done with it (kept alive to the end, S3's stacks raised its peak RSS by about 50 MiB)
	var recycle [][]float64
	for _, st := range [][]float64{bc, ac} {
		if len(st) <= pool.MaxScratch64 {
			recycle = append(recycle, st)
		}
	}
	off := 0
	for _, s := range srcs {
		fa, fb, err := s.Mod.Factors()
		if err != nil {
			return nil, nil, 0, 0, err
		}
		r := s.Mod.Rank
		c := s.Weight * s.Mod.Scaling
		for i := 0; i < out; i++ {
			row := bc[i*total+off : i*total+off+r]
			for j, v := range fb[i*r : (i+1)*r] {
				row[j] = c * float64(v)
			}
		}
		for i, v := range fa {
			ac[off*in+i] = float64(v)
		}
		off += r
	}
	bk, ak, sv, k := linalg.LowRankSVDBy(bc, ac, out, total, in, rule.Choose)
	for _, st := range recycle {
		pool.Put64(st)
	}
	b, a = ToFloat32(bk), ToFloat32(ak)
	if clamp != nil {
		ClampQuantile(a, b, *clamp)
	}
	return a, b, k, linalg.TruncationError(sv, k), nil
}

// ClampQuantile is PEFT's svd_clamp: hi = quantile(concat(B, A), q) with
// linear interpolation (torch.quantile), then both factors are clamped to
// [-hi, hi] in place.
func ClampQuantile(a, b []float32, q float64) {
	all := make([]float32, 0, len(a)+len(b))
	all = append(append(all, b...), a...)
	if len(all) == 0 {
		return
	}
	sort.Slice(all, func(i, j int) bool { return all[i] < all[j] })
	pos := q * float64(len(all)-1)
	lo := int(math.Floor(pos))
	hiIdx := min(lo+1, len(all)-1)
	frac := float32(pos - float64(lo))
	hi := all[lo] + frac*(all[hiIdx]-all[lo])
	for _, x := range [][]float32{a, b} {
		for i, v := range x {
			x[i] = min(max(v, -hi), hi)
		}
	}
}

// ToFloat32 rounds float64 values to float32.
func ToFloat32(x []float64) []float32 {
	out := make([]float32, len(x))
	for i, v := range x {
		out[i] = float32(v)
	}
	return out
}
