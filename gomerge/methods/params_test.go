package methods

import (
	"gomerge/gomerge/errs"
	"gomerge/gomerge/linalg"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// Each schema entry's check refuses a bad value, naming the parameter, for a
// method that takes it.
func TestParamChecksNameTheParameter(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	i := func(v int) *int { return &v }
	s := func(v string) *string { return &v }
	for _, tc := range []struct {
		name string
		c    Combine
		msg  string
	}{
		{"svd_rank", Combine{CombinationType: "svd", SVDRank: &linalg.RankSpec{Fixed: 0}}, "svd_rank: must be a positive integer"},
		{"svd_rank", Combine{CombinationType: "ties_svd", Density: f(0.5), SVDRank: &linalg.RankSpec{Energy: 0.9}}, "svd_rank: the energy rule needs the exact spectrum"},
		{"max_rank", Combine{CombinationType: "svd", MaxRank: i(0)}, "max_rank: must be a positive integer"},
		{"svd_clamp", Combine{CombinationType: "svd", SVDClamp: f(1.5)}, "svd_clamp: must be a quantile in [0, 1]"},
		{"svd_driver", Combine{CombinationType: "svd", SVDDriver: s("magic")}, "svd_driver: invalid value"},
		{"density", Combine{CombinationType: "ties"}, `density: combination_type "ties" needs a density`},
		{"density", Combine{CombinationType: "ties", Density: f(1.5)}, "density: must be in [0, 1], got 1.5"},
		{"density", Combine{CombinationType: "dare_linear", Density: f(0)}, "density: \"dare_linear\" rescales kept values"},
		{"majority_sign_method", Combine{CombinationType: "ties", Density: f(0.5), MajoritySignMethod: "mean"}, "majority_sign_method: invalid value"},
		{"lambda", Combine{CombinationType: "task_arithmetic", Lambda: f(math.Inf(1))}, "lambda: +Inf is not a finite number"},
		{"gamma", Combine{CombinationType: "breadcrumbs", Density: f(0.5), Gamma: f(1.5)}, "gamma: the fraction of largest magnitudes"},
		{"epsilon", Combine{CombinationType: "della", Density: f(0.5), Epsilon: f(-1)}, "epsilon: must be a number >= 0"},
		{"epsilon", Combine{CombinationType: "della", Density: f(0.1)}, "epsilon: must be chosen such that density +/- epsilon"},
		{"scaling", Combine{CombinationType: "iso_c", Scaling: f(math.Inf(1))}, "scaling: +Inf is not a finite number"},
		{"common_fraction", Combine{CombinationType: "iso_cts", CommonFraction: f(2)}, "common_fraction: the share of the common subspace"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.c.Validate()
			require.Error(t, err)
			assert.Contains(t, err.Error(), tc.msg)
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
		})
	}
}

// Every schema entry is a field of Combine with a doc and a known type; the
// defaults are those the engine applies.
func TestParamSchema(t *testing.T) {
	for _, p := range Params() {
		assert.NotEmpty(t, p.Doc, p.Name)
		assert.Contains(t, []string{"int", "float", "bool", "str", "rank"}, p.Type, p.Name)
		assert.NotNil(t, p.field, p.Name)
	}
	for name, want := range map[string]any{"lambda": DefaultLambda, "gamma": DefaultGamma, "epsilon": DefaultEpsilon,
		"scaling": DefaultScaling, "common_fraction": DefaultCommonFraction, "majority_sign_method": "total"} {
		p, ok := LookupParam(name)
		require.True(t, ok, name)
		assert.Equal(t, want, p.Default, name)
	}
	c := Combine{CombinationType: "breadcrumbs", Density: new(0.5)}
	require.NoError(t, c.Validate())
	m, _ := LookupMethod("breadcrumbs")
	assert.Contains(t, c.CardLines(m), "- gamma: 0.01", "the card shows the default the merge used")
}
