package methods

import (
	"context"
	"encoding/json"
	"gomerge/gomerge/errs"
	"slices"
	"strings"
)

// Family is how a method turns the adapters of a module into one adapter.
type Family string

// The families of merge methods.
const (
	// FamilyFactors combines the A and the B factors element-wise (PEFT's
	// family 1): all adapters need equal ranks, and B'A' holds the cross
	// terms B_i A_j.
	FamilyFactors Family = "factors"
	// FamilyCat stacks the scaled factors along the rank: B'A' is the
	// weighted sum of the updates exactly.
	FamilyCat Family = "cat"
	// FamilySVD factorises the weighted sum of the updates exactly, from the
	// factors, and truncates it to the output rank.
	FamilySVD Family = "svd"
	// FamilyDenseSVD prunes each adapter's dense update, combines them and
	// factorises the result by a seeded randomized SVD.
	FamilyDenseSVD Family = "dense_svd"
)

// Pruning is how a method sparsifies each task tensor before combining.
type Pruning string

// The pruning kinds.
const (
	PruneNone      Pruning = ""
	PruneMagnitude Pruning = "magnitude" // keep the density fraction of largest magnitudes
	PruneDARE      Pruning = "dare"      // DARE: Bernoulli(density) masks, kept values divided by density
	// PruneOutliers is mergekit's magnitude_outliers (Model Breadcrumbs): drop the gamma fraction of largest
	// and the smallest magnitudes, keep the density fraction in between
	PruneOutliers Pruning = "magnitude_outliers"
	// PruneDELLA is mergekit's della_magprune: per row, keep-probabilities from density - epsilon to
	// density + epsilon by magnitude rank, a Bernoulli mask, the l1 norm restored
	PruneDELLA Pruning = "della_magprune"
)

// RankRule gives the rank of a method's output: the merged adapter's rank
// from the adapters' ranks and the options, and how each module's rank
// follows from it. In JSON it is its name.
type RankRule struct {
	Name string
	// adapter is the merged adapter's rank; names are the adapters, for
	// errors.
	adapter func(ranks []int, names []string, m Method, c *Combine) (int, error)
	// Own: each module keeps its sources' common rank (which must agree).
	Own bool
	// exact: the method factorises its result from its exact spectrum, so
	// that svd_rank may be the energy rule.
	exact bool
	// spectral: without a fixed svd_rank each module's rank is that of its
	// merged update.
	spectral bool
}

// MarshalJSON writes the rule's name.
func (r *RankRule) MarshalJSON() ([]byte, error) { return json.Marshal(r.Name) }

// The rank rules.
var (
	// RankInput is the adapters' common rank.
	RankInput = &RankRule{Name: "input", adapter: equalRanks, Own: true}
	// RankSum is the sum of the adapters' ranks.
	RankSum = &RankRule{Name: "sum", adapter: func(ranks []int, _ []string, _ Method, _ *Combine) (int, error) {
		return sumOf(ranks), nil
	}}
	// RankSVDOrMax is svd_rank (a rank or the energy rule), by default the
	// largest input rank.
	RankSVDOrMax = &RankRule{Name: "svd_rank|max", adapter: svdRankOr(slices.Max[[]int]), exact: true}
	// RankRSVDOrMax is svd_rank (a rank: a randomized SVD has no exact
	// spectrum for the energy rule), by default the largest input rank.
	RankRSVDOrMax = &RankRule{Name: "svd_rank|max, randomized", adapter: svdRankOr(slices.Max[[]int])}
	// RankSVDOrSumAll is svd_rank, by default the sum of ranks (no
	// truncation).
	RankSVDOrSumAll = &RankRule{Name: "svd_rank|sum", adapter: svdRankOr(sumOf), exact: true}
)

// equalRanks is RankInput's rank: the adapters' rank, which must agree.
func equalRanks(ranks []int, names []string, m Method, _ *Combine) (int, error) {
	for i, r := range ranks {
		if r != ranks[0] {
			return 0, errs.Value("All adapters must have the same r value when using combination_type %s: "+
				"%s has r=%d, %s has r=%d (use cat or svd for adapters of different ranks)",
				m.Name, names[0], ranks[0], names[i], r)
		}
	}
	return ranks[0], nil
}

// svdRankOr is the rank of the svd_rank rules: a fixed svd_rank, else def
// of the ranks (the sum with the energy rule, each module's rank then
// coming from its spectrum), capped by max_rank.
func svdRankOr(def func([]int) int) func([]int, []string, Method, *Combine) (int, error) {
	return func(ranks []int, _ []string, _ Method, c *Combine) (int, error) {
		r := def(ranks)
		switch s := c.SVDRank; {
		case s != nil && s.Energy > 0:
			r = sumOf(ranks)
		case s != nil:
			r = s.Fixed
		}
		if c.MaxRank != nil {
			r = min(r, *c.MaxRank)
		}
		return r, nil
	}
}

func sumOf(xs []int) int {
	s := 0
	for _, x := range xs {
		s += x
	}
	return s
}

// mergeFunc merges one module: the one signature of every family. rank is
// the merged adapter's rank (the method's RankRule); the result carries
// the module's own rank.
type mergeFunc func(ctx context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error)

// memoryFunc estimates the bytes one module's merge holds at its peak.
type memoryFunc func(j *ModuleJob, c *Combine) int64

// moduleOutput is one merged module: its factors A' (rank x in) and B'
// (out x rank), and the relative Frobenius error of the factorisation of
// its update (NaN where there is none: factor-wise merges).
type moduleOutput struct {
	a, b   []float32
	rank   int
	relErr float64
}

// Method is one row of the method table: everything the engine, the Python
// layer and the docs know about a merge method.
type Method struct {
	Name    string    `json:"name"`
	Family  Family    `json:"family"`
	Pruning Pruning   `json:"pruning"`
	TIES    bool      `json:"ties"`   // TIES's sign election and disjoint mean after pruning
	Random  bool      `json:"random"` // draws masks: seed= reproduces it
	Rank    *RankRule `json:"rank"`
	PEFT    bool      `json:"peft"` // one of PEFT's eleven combination types, with PEFT's semantics
	// Params are the arguments the method reads beyond adapters and weights.
	Params []string `json:"params"`
	Doc    string   `json:"doc"`
	// Merge merges one module; Memory estimates its peak memory.
	Merge  mergeFunc  `json:"-"`
	Memory memoryFunc `json:"-"`
}

// NeedsDensity reports whether the method prunes and so needs a density.
func (m Method) NeedsDensity() bool { return m.Pruning != PruneNone }

var (
	peftSVDParams     = []string{"svd_rank", "max_rank", "svd_clamp", "svd_full_matrices", "svd_driver"}
	peftPruneParams   = []string{"density"}
	peftTIESParams    = []string{"density", "majority_sign_method"}
	peftDenseSVDPrune = append(slices.Clone(peftSVDParams), "density")
	peftDenseSVDTIES  = append(slices.Clone(peftSVDParams), "density", "majority_sign_method")
	breadcrumbsParams = []string{"density", "gamma", "lambda", "svd_rank", "max_rank", "svd_clamp"}
	dellaParams       = []string{"density", "epsilon", "lambda", "svd_rank", "max_rank", "svd_clamp"}
	spanParams        = []string{"scaling", "svd_rank", "max_rank"}
	coreTIESParams    = []string{"density", "majority_sign_method", "scaling", "svd_rank", "max_rank"}
	knotsLinearParams = []string{"density", "scaling", "svd_rank", "max_rank"}
)

// methods is the method table. PEFT's eleven names keep PEFT's semantics;
// the others are gomerge's own. A new method is one row here and, for a new
// family, one merge_*.go file.
var methods = []Method{
	{Name: "svd", Family: FamilySVD, Merge: svdModule, Memory: exactMemory, Rank: RankSVDOrMax, PEFT: true, Params: peftSVDParams,
		Doc: "rank-svd_rank truncated SVD of sum_i w_i s_i B_i A_i, computed exactly from the factors"},
	{Name: "linear", Family: FamilyFactors, Merge: factorsModule, Memory: factorMemory, Rank: RankInput, PEFT: true,
		Doc: "weighted sum of the factors (A with sign(c) sqrt|c|, B with sqrt|c|): B'A' holds the cross terms B_i A_j"},
	{Name: "cat", Family: FamilyCat, Merge: catModule, Memory: factorMemory, Rank: RankSum, PEFT: true,
		Doc: "the scaled factors stacked along the rank: B'A' = sum_i w_i s_i B_i A_i exactly"},
	{Name: "ties", Family: FamilyFactors, Merge: factorsModule, Memory: factorMemory, Pruning: PruneMagnitude, TIES: true, Rank: RankInput, PEFT: true,
		Params: peftTIESParams, Doc: "TIES on the factors: magnitude pruning, sign election, disjoint mean"},
	{Name: "ties_svd", Family: FamilyDenseSVD, Merge: denseSVDModule, Memory: denseMemory, Pruning: PruneMagnitude, TIES: true, Rank: RankRSVDOrMax, PEFT: true,
		Params: peftDenseSVDTIES, Doc: "TIES on the dense updates, then a rank-svd_rank SVD"},
	{Name: "dare_linear", Family: FamilyFactors, Merge: factorsModule, Memory: factorMemory, Pruning: PruneDARE, Random: true, Rank: RankInput, PEFT: true,
		Params: peftPruneParams, Doc: "DARE's random masks on the factors, then a weighted sum"},
	{Name: "dare_ties", Family: FamilyFactors, Merge: factorsModule, Memory: factorMemory, Pruning: PruneDARE, TIES: true, Random: true, Rank: RankInput,
		PEFT: true, Params: peftTIESParams, Doc: "DARE's random masks on the factors, then sign election and disjoint mean"},
	{Name: "dare_linear_svd", Family: FamilyDenseSVD, Merge: denseSVDModule, Memory: denseMemory, Pruning: PruneDARE, Random: true, Rank: RankRSVDOrMax,
		PEFT: true, Params: peftDenseSVDPrune, Doc: "DARE on the dense updates, weighted sum, then a rank-svd_rank SVD"},
	{Name: "dare_ties_svd", Family: FamilyDenseSVD, Merge: denseSVDModule, Memory: denseMemory, Pruning: PruneDARE, TIES: true, Random: true,
		Rank: RankRSVDOrMax, PEFT: true, Params: peftDenseSVDTIES, Doc: "DARE and TIES on the dense updates, then a rank-svd_rank SVD"},
	{Name: "magnitude_prune", Family: FamilyFactors, Merge: factorsModule, Memory: factorMemory, Pruning: PruneMagnitude, Rank: RankInput, PEFT: true,
		Params: peftPruneParams, Doc: "magnitude pruning of the factors, then a weighted sum"},
	{Name: "magnitude_prune_svd", Family: FamilyDenseSVD, Merge: denseSVDModule, Memory: denseMemory, Pruning: PruneMagnitude, Rank: RankRSVDOrMax, PEFT: true,
		Params: peftDenseSVDPrune, Doc: "magnitude pruning of the dense updates, weighted sum, then a rank-svd_rank SVD"},
	{Name: "task_arithmetic", Family: FamilyCat, Merge: taskArithmeticModule, Memory: taskArithmeticMemory, Rank: RankSVDOrSumAll, Params: []string{"lambda", "svd_rank", "max_rank"},
		Doc: "lambda * sum_i w_i s_i B_i A_i, the exact weighted sum of the updates (no cross terms): rank = sum of " +
			"ranks, or truncated to svd_rank by the exact SVD"},
	{Name: "breadcrumbs", Family: FamilyDenseSVD, Merge: mergekitModule(mkBreadcrumbs), Memory: denseMemory, Pruning: PruneOutliers, Rank: RankRSVDOrMax, Params: breadcrumbsParams,
		Doc: "mergekit's Model Breadcrumbs: per dense update, drop the gamma fraction of largest and the smallest " +
			"magnitudes (density kept), lambda * sum_i w_i dW_i, then a rank-svd_rank SVD"},
	{Name: "breadcrumbs_ties", Family: FamilyDenseSVD, Merge: mergekitModule(mkBreadcrumbs), Memory: denseMemory, Pruning: PruneOutliers, TIES: true, Rank: RankRSVDOrMax,
		Params: breadcrumbsParams, Doc: "breadcrumbs with mergekit's TIES sign consensus (the sign of the weighted sum), " +
			"not normalised, then a rank-svd_rank SVD"},
	{Name: "della", Family: FamilyDenseSVD, Merge: mergekitModule(mkDella), Memory: denseMemory, Pruning: PruneDELLA, TIES: true, Random: true, Rank: RankRSVDOrMax,
		Params: dellaParams, Doc: "mergekit's DELLA: per row, keep-probabilities density +/- epsilon by magnitude rank, " +
			"l1 rescale, TIES sign consensus, divided by the agreeing weights, then a rank-svd_rank SVD"},
	{Name: "della_linear", Family: FamilyDenseSVD, Merge: mergekitModule(mkDellaLinear), Memory: denseMemory, Pruning: PruneDELLA, Random: true, Rank: RankRSVDOrMax,
		Params: dellaParams, Doc: "DELLA's masks and l1 rescale, lambda * sum_i w_i dW_i, then a rank-svd_rank SVD"},
	{Name: "iso_c", Family: FamilySpan, Merge: spanModule(inSpan(isoCSpan)), Memory: exactMemory, Rank: RankSpan, Params: spanParams,
		Doc: "Iso-C: the SVD of sum_i w_i s_i B_i A_i = U S V^T with its nonzero singular values replaced by their " +
			"mean times scaling; rank = the sum's rank (or svd_rank), exact in the span of the factors"},
	{Name: "tsv", Family: FamilySpan, Merge: spanModule(inSpan(tsvSpan)), Memory: exactMemory, Rank: RankSpan, Params: spanParams,
		Doc: "TSV-M: each update's top min(r_i, min(m, n) / T) singular triplets, the stacked U's and V's " +
			"orthogonalised (polar factors), scaling * U_perp S V_perp^T; exact in the span of the factors"},
	{Name: "iso_cts", Family: FamilySpan, Merge: spanModule(inSpan(isoCTSSpan)), Memory: exactMemory, Rank: RankSpan, Params: append(slices.Clone(spanParams), "common_fraction"),
		Doc: "Iso-CTS: the top common_fraction of the summed update's directions, each task's top directions with " +
			"them projected out, orthogonalised (polar factors), all at the mean singular value times scaling"},
	{Name: "core_ties", Family: FamilySpan, Merge: spanModule(inSpan(coreCombine)), Memory: exactMemory, Pruning: PruneMagnitude, TIES: true, Rank: RankSpan, Params: coreTIESParams,
		Doc: "Core Space TIES: PEFT's TIES (density, sign election, disjoint mean) on the R x R core matrices " +
			"U_B^T s_i B_i A_i V_A (U_B, V_A: singular bases of the stacked B's and A's), D = scaling * U_B M V_A^T"},
	{Name: "core_tsv", Family: FamilySpan, Merge: spanModule(inSpan(coreTSV)), Memory: exactMemory, Rank: RankSpan, Params: spanParams,
		Doc: "Core Space TSV-M: TSV-M on the core matrices U_B^T w_i s_i B_i A_i V_A, each task keeping " +
			"floor(R / T) triplets, D = scaling * U_B M V_A^T"},
	{Name: "core_dare_ties", Family: FamilySpan, Merge: spanModule(inSpan(coreCombine)), Memory: exactMemory, Pruning: PruneDARE, TIES: true, Random: true, Rank: RankSpan,
		Params: coreTIESParams, Doc: "Core Space DARE-TIES: PEFT's dare_ties (DARE's masks, kept values divided by " +
			"density, sign election, disjoint mean) on the core matrices, D = scaling * U_B M V_A^T"},
	{Name: "core_iso_c", Family: FamilySpan, Merge: spanModule(inSpan(coreIsoC)), Memory: exactMemory, Rank: RankSpan, Params: spanParams,
		Doc: "Core Space Iso-C: the summed core matrix sum_i M_i, its nonzero singular values replaced by the mean " +
			"of all min(qB, qA) of them (zeros included) times scaling, D = U_B M V_A^T; iso_c where the sum has full rank"},
	{Name: "knots_ties", Family: FamilySpan, Merge: spanModule(knots), Memory: exactMemory, Pruning: PruneMagnitude, TIES: true, Rank: RankSpan, Params: coreTIESParams,
		Doc: "KnOTS TIES: the SVD of the concatenated updates [dW_1 ... dW_T] = U S [V_1^T ... V_T^T] aligns the " +
			"tasks; PEFT's TIES of the S V_i^T with weights w_i, D = scaling * U X"},
	{Name: "knots_dare_ties", Family: FamilySpan, Merge: spanModule(knots), Memory: exactMemory, Pruning: PruneDARE, TIES: true, Random: true, Rank: RankSpan,
		Params: coreTIESParams, Doc: "KnOTS DARE-TIES: KnOTS's alignment, then PEFT's dare_ties of the S V_i^T " +
			"(DARE's masks, sign election, disjoint mean), D = scaling * U X"},
	{Name: "knots_linear", Family: FamilySpan, Merge: spanModule(knots), Memory: exactMemory, Pruning: PruneMagnitude, Rank: RankSpan, Params: knotsLinearParams,
		Doc: "KnOTS linear: KnOTS's alignment, each S V_i^T pruned to density by magnitude, the weighted sum " +
			"sum_i w_i S V_i^T, D = scaling * U X (density 1: task arithmetic)"},
}

// The random methods read seed: it is added to their Params here, so that
// the parameters and Random cannot disagree.
func init() {
	for i, m := range methods {
		if m.Random {
			methods[i].Params = append(slices.Clone(m.Params), "seed")
		}
	}
}

// Methods returns the method table, in the order of the docs.
func Methods() []Method {
	out := slices.Clone(methods)
	for i := range out {
		if out[i].Params == nil {
			out[i].Params = []string{} // JSON: [], not null
		}
	}
	return out
}

// LookupMethod returns the row of a method name, or a ValueError listing
// every name.
func LookupMethod(name string) (Method, error) {
	for _, m := range methods {
		if m.Name == name {
			return m, nil
		}
	}
	return Method{}, errs.Value("combination_type: invalid value %q (expected one of %s)", name, methodNames())
}

// methodNames lists the method names for error messages.
func methodNames() string {
	names := make([]string, len(methods))
	for i, m := range methods {
		names[i] = m.Name
	}
	return strings.Join(names, ", ")
}

// takes reports whether the method reads the parameter.
func (m Method) takes(param string) bool { return slices.Contains(m.Params, param) }
