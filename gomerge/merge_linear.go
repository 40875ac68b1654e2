package gomerge

import "math"

// factorWeights returns PEFT's weights for combining A and B separately:
// c = w * scaling, A gets sign(c) * sqrt(|c|) (sign(0) = +1), B gets sqrt(|c|).
// They are rounded to float32 as torch.tensor(list) does.
func factorWeights(w, scaling float64) (wa, wb float32) {
	c := w * scaling
	sq := math.Sqrt(math.Abs(c))
	if c < 0 {
		return float32(-sq), float32(sq)
	}
	return float32(sq), float32(sq)
}

// mergeLinear is PEFT's "linear" combination on the factors:
// A' = sum_i sign(c_i) sqrt|c_i| A_i and B' = sum_i sqrt|c_i| B_i. B'A'
// contains the cross terms B_i A_j, exactly as PEFT computes it.
func mergeLinear(srcs []source) (a, b []float32, rank int) {
	as := make([][]float32, len(srcs))
	bs := make([][]float32, len(srcs))
	was := make([]float32, len(srcs))
	wbs := make([]float32, len(srcs))
	for i, s := range srcs {
		as[i], bs[i] = s.mod.Factors()
		was[i], wbs[i] = factorWeights(s.weight, s.mod.Scaling)
	}
	return TaskArithmetic(as, was), TaskArithmetic(bs, wbs), srcs[0].mod.Rank
}
