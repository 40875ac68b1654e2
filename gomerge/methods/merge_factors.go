package methods

import (
	"context"
	"gomerge/gomerge/errs"
	"math"
	"strconv"
)

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

// factorsModule is the merge of the factor-wise rows: each module keeps its
// sources' rank, which must fit the adapter's.
func factorsModule(_ context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
	a, b, r, err := mergeFactors(j.Srcs, c.combination(), c.seed(), j.Name)
	if err != nil {
		return moduleOutput{}, err
	}
	if r > rank {
		return moduleOutput{}, errs.Value("module %s: rank %d is above the adapter's rank %d", j.Name, r, rank)
	}
	return moduleOutput{a: a, b: b, rank: r, relErr: math.NaN()}, nil
}

// mergeFactors is PEFT's family 1 (linear, ties, dare_linear, dare_ties,
// magnitude_prune): the A factors are combined element-wise with weights
// sign(c_i) sqrt|c_i|, the B factors with sqrt|c_i|, by the same function.
// B'A' therefore contains the cross terms B_i A_j, exactly as in PEFT. DARE
// draws one mask per factor, labelled by factor and adapter position.
func mergeFactors(srcs []Source, comb Combination, seed uint64, module string) (a, b []float32, rank int, err error) {
	as := make([][]float32, len(srcs))
	bs := make([][]float32, len(srcs))
	was := make([]float32, len(srcs))
	wbs := make([]float32, len(srcs))
	for i, s := range srcs {
		if as[i], bs[i], err = s.Mod.Factors(); err != nil {
			return nil, nil, 0, err
		}
		was[i], wbs[i] = factorWeights(s.Weight, s.Mod.Scaling)
	}
	dare := func(factor string) func(int, []float32) {
		return func(i int, t []float32) {
			mask := srcs[i].MaskA
			if factor == "B" {
				mask = srcs[i].MaskB
			}
			if mask != nil {
				MaskPrune(t, mask, comb.Density, true)
			} else {
				RandomPrune(t, comb.Density, true, TensorSource(seed, module, factor+"/"+strconv.Itoa(srcs[i].Index)))
			}
		}
	}
	return comb.Apply(as, was, dare("A"), false), comb.Apply(bs, wbs, dare("B"), false), srcs[0].Mod.Rank, nil
}
