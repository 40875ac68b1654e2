package methods

import (
	"context"
	"math"
	"strconv"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/safetensors"
)

// rsvdSeed seeds the range finder's test matrix: fixed, so that the pruned
// SVD merges without DARE are deterministic whatever the merge seed.
const rsvdSeed = 0x9e3779b97f4a7c15

// mergeDenseSVD is PEFT's family 2 with pruning (ties_svd, dare_linear_svd,
// dare_ties_svd, magnitude_prune_svd) and mergekit's methods (g non-nil:
// breadcrumbs, della; merge_generalized.go): each source's dense update
// dW_i = s_i B_i A_i, combined element-wise with the user weights w_i (the
// scaling is already inside dW_i), then a rank-k truncated SVD of the
// result. Pruning makes D full rank, so the SVD is randomized (RandomizedSVD).
// relErr is the relative Frobenius error of the factorisation, before any
// clamp: B'A' is an orthogonal projection of D, so ||D - B'A'||^2 =
// ||D||^2 - ||B'||^2 (A' has orthonormal rows).
func mergeDenseSVD(ctx context.Context, j *ModuleJob, comb Combination, g *generalized, k int, clamp *float64, seed uint64) (a, b []float32, relErr float64, err error) {
	dws := make([][]float32, len(j.Srcs))
	defer func() {
		for _, dw := range dws { // the result d is dws[0]
			if dw != nil {
				pool.Put(dw)
			}
		}
	}()
	weights := make([]float32, len(j.Srcs))
	fused := g != nil && g.fusedDella(j)
	var scales []float32 // fused: the rescale factors of the pruned updates
	for i, s := range j.Srcs {
		fa, fb, err := s.Mod.Factors()
		if err != nil {
			return nil, nil, 0, err
		}
		weights[i] = float32(s.Weight)
		if fused { // each row computed, rounded and pruned while it is in the cache
			dws[i] = pool.Get(j.Out * j.In)
			scales = append(scales, g.dellaDense(dws[i], fa, fb, j, s))
		} else {
			dws[i] = linalg.DenseDelta(fa, fb, j.Out, s.Mod.Rank, j.In, s.Mod.Scaling)
			if s.RoundDW != "" && s.RoundDW != safetensors.F32 {
				roundTo(dws[i], s.RoundDW)
			}
		}
		if ctx.Err() != nil {
			return nil, nil, 0, errs.ErrCancelled
		}
	}
	var d []float32
	switch {
	case fused:
		d = g.combineScaled(dws, weights, scales)
	case g != nil: // mergekit's methods (merge_generalized.go)
		d = g.combineModule(j, dws, weights)
	default:
		d = comb.Apply(dws, weights, func(i int, t []float32) {
			if mask := j.Srcs[i].MaskDW; mask != nil {
				MaskPrune(t, mask, comb.Density, true)
			} else {
				RandomPrune(t, comb.Density, true, TensorSource(seed, j.Name, "dW/"+strconv.Itoa(j.Srcs[i].Index)))
			}
		}, true)
	}
	if ctx.Err() != nil {
		return nil, nil, 0, errs.ErrCancelled
	}
	bk, ak := linalg.RandomizedSVD(d, j.Out, j.In, k, TensorRNG(rsvdSeed, j.Name, "rsvd"))
	var total, kept float64
	for _, v := range d {
		total += float64(v) * float64(v)
	}
	for _, v := range bk {
		kept += v * v
	}
	if total > 0 {
		relErr = math.Sqrt(max(0, total-kept) / total)
	}
	b, a = ToFloat32(bk), ToFloat32(ak)
	if clamp != nil {
		ClampQuantile(a, b, *clamp)
	}
	return a, b, relErr, nil
}

// denseSVDModule is the merge of PEFT's pruned *_svd rows: the dense
// updates combined element-wise by the row's pruning and TIES, then a
// randomized SVD at the adapter's rank.
func denseSVDModule(ctx context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
	a, b, relErr, err := mergeDenseSVD(ctx, j, c.combination(), nil, rank, c.SVDClamp, c.seed())
	return moduleOutput{a: a, b: b, rank: rank, relErr: relErr}, err
}

// roundTo rounds t in place to the dtype dt (PEFT's dense update in the
// adapter's dtype).
func roundTo(t []float32, dt safetensors.DType) {
	for e, v := range t {
		t[e] = safetensors.Round(dt, v)
	}
}
