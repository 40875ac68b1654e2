package gomerge

import (
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

// RankRule gives the rank of a method's output.
type RankRule string

// The rank rules.
const (
	RankInput       RankRule = "input"        // the adapters' common rank
	RankSum         RankRule = "sum"          // the sum of the adapters' ranks
	RankSVDOrMax    RankRule = "svd_rank|max" // svd_rank, by default the largest input rank
	RankSVDOrSumAll RankRule = "svd_rank|sum" // svd_rank, by default the sum of ranks (no truncation)
)

// Method is one row of the method table: everything the engine, the Python
// layer and the docs know about a merge method.
type Method struct {
	Name    string   `json:"name"`
	Family  Family   `json:"family"`
	Pruning Pruning  `json:"pruning"`
	TIES    bool     `json:"ties"`   // TIES's sign election and disjoint mean after pruning
	Random  bool     `json:"random"` // draws masks: seed= reproduces it
	Rank    RankRule `json:"rank"`
	PEFT    bool     `json:"peft"` // one of PEFT's eleven combination types, with PEFT's semantics
	// Params are the arguments the method reads beyond adapters and weights.
	Params []string `json:"params"`
	Doc    string   `json:"doc"`
}

// NeedsDensity reports whether the method prunes and so needs a density.
func (m Method) NeedsDensity() bool { return m.Pruning != PruneNone }

// combination is the element-wise method applied to the task tensors.
func (m Method) combination() string {
	switch {
	case m.Pruning == PruneOutliers || m.Pruning == PruneDELLA:
		return m.Name // mergekit's own combination (merge_generalized.go)
	case m.Pruning == PruneDARE && m.TIES:
		return "dare_ties"
	case m.Pruning == PruneDARE:
		return "dare_linear"
	case m.TIES:
		return "ties"
	case m.Pruning == PruneMagnitude:
		return "magnitude_prune"
	}
	return "task_arithmetic"
}

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
	{Name: "svd", Family: FamilySVD, Rank: RankSVDOrMax, PEFT: true, Params: peftSVDParams,
		Doc: "rank-svd_rank truncated SVD of sum_i w_i s_i B_i A_i, computed exactly from the factors"},
	{Name: "linear", Family: FamilyFactors, Rank: RankInput, PEFT: true,
		Doc: "weighted sum of the factors (A with sign(c) sqrt|c|, B with sqrt|c|): B'A' holds the cross terms B_i A_j"},
	{Name: "cat", Family: FamilyCat, Rank: RankSum, PEFT: true,
		Doc: "the scaled factors stacked along the rank: B'A' = sum_i w_i s_i B_i A_i exactly"},
	{Name: "ties", Family: FamilyFactors, Pruning: PruneMagnitude, TIES: true, Rank: RankInput, PEFT: true,
		Params: peftTIESParams, Doc: "TIES on the factors: magnitude pruning, sign election, disjoint mean"},
	{Name: "ties_svd", Family: FamilyDenseSVD, Pruning: PruneMagnitude, TIES: true, Rank: RankSVDOrMax, PEFT: true,
		Params: peftDenseSVDTIES, Doc: "TIES on the dense updates, then a rank-svd_rank SVD"},
	{Name: "dare_linear", Family: FamilyFactors, Pruning: PruneDARE, Random: true, Rank: RankInput, PEFT: true,
		Params: peftPruneParams, Doc: "DARE's random masks on the factors, then a weighted sum"},
	{Name: "dare_ties", Family: FamilyFactors, Pruning: PruneDARE, TIES: true, Random: true, Rank: RankInput,
		PEFT: true, Params: peftTIESParams, Doc: "DARE's random masks on the factors, then sign election and disjoint mean"},
	{Name: "dare_linear_svd", Family: FamilyDenseSVD, Pruning: PruneDARE, Random: true, Rank: RankSVDOrMax,
		PEFT: true, Params: peftDenseSVDPrune, Doc: "DARE on the dense updates, weighted sum, then a rank-svd_rank SVD"},
	{Name: "dare_ties_svd", Family: FamilyDenseSVD, Pruning: PruneDARE, TIES: true, Random: true,
		Rank: RankSVDOrMax, PEFT: true, Params: peftDenseSVDTIES, Doc: "DARE and TIES on the dense updates, then a rank-svd_rank SVD"},
	{Name: "magnitude_prune", Family: FamilyFactors, Pruning: PruneMagnitude, Rank: RankInput, PEFT: true,
		Params: peftPruneParams, Doc: "magnitude pruning of the factors, then a weighted sum"},
	{Name: "magnitude_prune_svd", Family: FamilyDenseSVD, Pruning: PruneMagnitude, Rank: RankSVDOrMax, PEFT: true,
		Params: peftDenseSVDPrune, Doc: "magnitude pruning of the dense updates, weighted sum, then a rank-svd_rank SVD"},
	{Name: "task_arithmetic", Family: FamilyCat, Rank: RankSVDOrSumAll, Params: []string{"lambda", "svd_rank", "max_rank"},
		Doc: "lambda * sum_i w_i s_i B_i A_i, the exact weighted sum of the updates (no cross terms): rank = sum of " +
			"ranks, or truncated to svd_rank by the exact SVD"},
	{Name: "breadcrumbs", Family: FamilyDenseSVD, Pruning: PruneOutliers, Rank: RankSVDOrMax, Params: breadcrumbsParams,
		Doc: "mergekit's Model Breadcrumbs: per dense update, drop the gamma fraction of largest and the smallest " +
			"magnitudes (density kept), lambda * sum_i w_i dW_i, then a rank-svd_rank SVD"},
	{Name: "breadcrumbs_ties", Family: FamilyDenseSVD, Pruning: PruneOutliers, TIES: true, Rank: RankSVDOrMax,
		Params: breadcrumbsParams, Doc: "breadcrumbs with mergekit's TIES sign consensus (the sign of the weighted sum), " +
			"not normalised, then a rank-svd_rank SVD"},
	{Name: "della", Family: FamilyDenseSVD, Pruning: PruneDELLA, TIES: true, Random: true, Rank: RankSVDOrMax,
		Params: dellaParams, Doc: "mergekit's DELLA: per row, keep-probabilities density +/- epsilon by magnitude rank, " +
			"l1 rescale, TIES sign consensus, divided by the agreeing weights, then a rank-svd_rank SVD"},
	{Name: "della_linear", Family: FamilyDenseSVD, Pruning: PruneDELLA, Random: true, Rank: RankSVDOrMax,
		Params: dellaParams, Doc: "DELLA's masks and l1 rescale, lambda * sum_i w_i dW_i, then a rank-svd_rank SVD"},
	{Name: "iso_c", Family: FamilySpan, Rank: RankSpan, Params: spanParams,
		Doc: "Iso-C: the SVD of sum_i w_i s_i B_i A_i = U S V^T with its nonzero singular values replaced by their " +
			"mean times scaling; rank = the sum's rank (or svd_rank), exact in the span of the factors"},
	{Name: "tsv", Family: FamilySpan, Rank: RankSpan, Params: spanParams,
		Doc: "TSV-M: each update's top min(r_i, min(m, n) / T) singular triplets, the stacked U's and V's " +
			"orthogonalised (polar factors), scaling * U_perp S V_perp^T; exact in the span of the factors"},
	{Name: "iso_cts", Family: FamilySpan, Rank: RankSpan, Params: append(slices.Clone(spanParams), "common_fraction"),
		Doc: "Iso-CTS: the top common_fraction of the summed update's directions, each task's top directions with " +
			"them projected out, orthogonalised (polar factors), all at the mean singular value times scaling"},
	{Name: "core_ties", Family: FamilySpan, Pruning: PruneMagnitude, TIES: true, Rank: RankSpan, Params: coreTIESParams,
		Doc: "Core Space TIES: PEFT's TIES (density, sign election, disjoint mean) on the R x R core matrices " +
			"U_B^T s_i B_i A_i V_A (U_B, V_A: singular bases of the stacked B's and A's), D = scaling * U_B M V_A^T"},
	{Name: "core_tsv", Family: FamilySpan, Rank: RankSpan, Params: spanParams,
		Doc: "Core Space TSV-M: TSV-M on the core matrices U_B^T w_i s_i B_i A_i V_A, each task keeping " +
			"floor(R / T) triplets, D = scaling * U_B M V_A^T"},
	{Name: "core_dare_ties", Family: FamilySpan, Pruning: PruneDARE, TIES: true, Random: true, Rank: RankSpan,
		Params: coreTIESParams, Doc: "Core Space DARE-TIES: PEFT's dare_ties (DARE's masks, kept values divided by " +
			"density, sign election, disjoint mean) on the core matrices, D = scaling * U_B M V_A^T"},
	{Name: "core_iso_c", Family: FamilySpan, Rank: RankSpan, Params: spanParams,
		Doc: "Core Space Iso-C: the summed core matrix sum_i M_i, its nonzero singular values replaced by the mean " +
			"of all min(qB, qA) of them (zeros included) times scaling, D = U_B M V_A^T; iso_c where the sum has full rank"},
	{Name: "knots_ties", Family: FamilySpan, Pruning: PruneMagnitude, TIES: true, Rank: RankSpan, Params: coreTIESParams,
		Doc: "KnOTS TIES: the SVD of the concatenated updates [dW_1 ... dW_T] = U S [V_1^T ... V_T^T] aligns the " +
			"tasks; PEFT's TIES of the S V_i^T with weights w_i, D = scaling * U X"},
	{Name: "knots_dare_ties", Family: FamilySpan, Pruning: PruneDARE, TIES: true, Random: true, Rank: RankSpan,
		Params: coreTIESParams, Doc: "KnOTS DARE-TIES: KnOTS's alignment, then PEFT's dare_ties of the S V_i^T " +
			"(DARE's masks, sign election, disjoint mean), D = scaling * U X"},
	{Name: "knots_linear", Family: FamilySpan, Pruning: PruneMagnitude, Rank: RankSpan, Params: knotsLinearParams,
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
	return Method{}, valueErr("combination_type: invalid value %q (expected one of %s)", name, methodNames())
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

// family is the family a merge runs with these options: a task arithmetic
// truncated by svd_rank runs as an exact SVD.
func (m Method) family(svdRank *RankSpec) Family {
	if m.Rank == RankSVDOrSumAll && svdRank != nil {
		return FamilySVD
	}
	return m.Family
}
