package methods

import (
	"context"
	"math"

	"gomerge/gomerge/kernels"
	"gomerge/gomerge/parallel"
)

// mergekitMethod is one of mergekit's GeneralizedTaskArithmeticMerge rows
// (merge_methods/registry.py, mergekit 0.1.5) that gomerge runs on the
// adapters' dense updates: the sparsification comes from the method table's
// Pruning, the sign consensus ("sum") from its TIES; normalize divides by
// the summed weights of the agreeing tasks, rescale restores each pruned
// task tensor's l1 norm (mergekit's defaults, given in the method rows).
type mergekitMethod struct {
	normalize, rescale bool
}

// mergekit's defaults of normalize and rescale, for the method rows.
var (
	mkBreadcrumbs = mergekitMethod{normalize: false, rescale: false}
	mkDella       = mergekitMethod{normalize: true, rescale: true}
	mkDellaLinear = mergekitMethod{normalize: false, rescale: true}
)

// Defaults of mergekit's per-model parameters.
const (
	DefaultGamma   = 0.01 // breadcrumbs: the fraction of largest magnitudes dropped
	DefaultEpsilon = 0.15 // della: half the spread of the keep-probabilities around density
)

// generalized is a merge by one of the mergekit methods, with its
// arguments resolved.
type generalized struct {
	mergekitMethod
	pruning                         Pruning
	consensus                       bool
	density, gamma, epsilon, lambda float64
	seed                            uint64
}

// generalized returns the mergekit-style merge mk with the options
// resolved (the schema's defaults for those not given).
func (o *Combine) generalized(mk mergekitMethod) *generalized {
	g := &generalized{mergekitMethod: mk, pruning: o.method.Pruning, consensus: o.method.TIES, density: 1,
		gamma: DefaultGamma, epsilon: DefaultEpsilon, lambda: o.lambda(), seed: o.seed()}
	if o.Density != nil {
		g.density = *o.Density
	}
	if o.Gamma != nil {
		g.gamma = *o.Gamma
	}
	if o.Epsilon != nil {
		g.epsilon = *o.Epsilon
	}
	return g
}

// mergekitModule is the merge of a mergekit method's rows: its dense
// updates pruned and combined by mk, then a randomized SVD.
func mergekitModule(mk mergekitMethod) mergeFunc {
	return func(ctx context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
		a, b, relErr, err := mergeDenseSVD(ctx, j, Combination{}, c.generalized(mk), rank, c.SVDClamp, c.seed())
		return moduleOutput{a: a, b: b, rank: rank, relErr: relErr}, err
	}
}

// prune sparsifies one task tensor in place (the dense update of source
// index, laid out rows x cols x inner) and returns the factor of its l1
// rescale, which the caller multiplies it by (float32; 1 for none): DELLA's
// masked tensor times the factor is DellaPrune's.
func (g *generalized) prune(t []float32, module string, index, rows, cols, inner int) float32 {
	switch g.pruning {
	case PruneOutliers:
		MagnitudeOutliers(t, g.density, g.gamma) // breadcrumbs do not rescale (mergekit's default)
	case PruneDELLA:
		return dellaMask(t, rows, cols, inner, g.density, g.epsilon, g.rescale, dellaSource(g.seed, module, index))
	}
	return 1
}

// combine is mergekit's generalized task arithmetic on the dense updates
// dws (scratch; the result is written over dws[0]): each is pruned, then
// multiplied by its weight (float32); with consensus each element keeps the
// tasks whose sign is the sign of the weighted sum (a sum >= 0 elects +1;
// zeros never agree); normalize divides by the summed weights of the kept
// tasks (the sum of all weights without consensus; a divisor of 0, or below
// 1e-8 without consensus, is 1); lambda scales the result. The rescale of
// a pruned tensor (its factor from prune) is applied here, as the tensor is
// read: (t * factor) * weight, in float32, as when t was rescaled first.
func (g *generalized) combine(dws [][]float32, weights []float32, indices []int, module string, rows, cols, inner int) []float32 {
	scales := make([]float32, len(dws))
	parallel.For(len(dws), max(1, combineGrain*4/max(1, len(dws[0]))), func(lo, hi int) {
		for i := lo; i < hi; i++ {
			scales[i] = g.prune(dws[i], module, indices[i], rows, cols, inner)
		}
	})
	return g.combineScaled(dws, weights, scales)
}

// combineScaled is combine on pruned tensors dws with their rescale
// factors.
func (g *generalized) combineScaled(dws [][]float32, weights, scales []float32) []float32 {
	out := dws[0]
	lambda := float32(g.lambda)
	var divisor float32 // without consensus: the sum of the weights
	for _, w := range weights {
		divisor += w
	}
	if float32(math.Abs(float64(divisor))) < 1e-8 {
		divisor = 1
	}
	parallel.For(len(out), combineGrain, func(lo, hi int) {
		ts := make([][]float32, len(dws))
		for i, t := range dws {
			ts[i] = t[lo:hi]
		}
		// out is dws[0]: each block of it is read before it is written
		kernels.GTAInto(out[lo:hi], ts, scales, weights, g.consensus, g.normalize, divisor, lambda)
	})
	return out
}

// layout is the update's shape for DELLA's rows: out x in x (kh * kw) for
// a Conv2d (A is r x in x kh x kw), out x in x 1 otherwise.
func (j *ModuleJob) layout() (rows, cols, inner int) {
	cols, inner = j.In, 1
	if len(j.ATail) > 1 {
		cols, inner = j.ATail[0], j.In/j.ATail[0]
	}
	return j.Out, cols, inner
}

// combineModule combines the module's dense updates by the mergekit
// method g (mergeDenseSVD's combination for those methods).
func (g *generalized) combineModule(j *ModuleJob, dws [][]float32, weights []float32) []float32 {
	indices := make([]int, len(j.Srcs))
	for i, s := range j.Srcs {
		indices[i] = s.Index
	}
	rows, cols, inner := j.layout()
	return g.combine(dws, weights, indices, j.Name, rows, cols, inner)
}
