package methods

import (
	"fmt"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/linalg"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// withParam sets one combination argument to a valid value that is not its
// default.
func withParam(c *Combine, name string) {
	f := func(v float64) *float64 { return &v }
	switch name {
	case "svd_rank":
		c.SVDRank = &linalg.RankSpec{Fixed: 4}
	case "max_rank":
		r := 4
		c.MaxRank = &r
	case "svd_clamp":
		c.SVDClamp = f(0.9)
	case "svd_full_matrices":
		full := false
		c.SVDFullMatrices = &full
	case "svd_driver":
		d := "gesvd"
		c.SVDDriver = &d
	case "density":
		c.Density = f(0.5)
	case "majority_sign_method":
		c.MajoritySignMethod = "frequency"
	case "seed":
		s := uint64(7)
		c.Seed = &s
	case "lambda":
		c.Lambda = f(0.5)
	case "gamma":
		c.Gamma = f(0.05)
	case "epsilon":
		c.Epsilon = f(0.1)
	case "scaling":
		c.Scaling = f(2)
	case "common_fraction":
		c.CommonFraction = f(0.5)
	default:
		panic("unknown parameter " + name)
	}
}

// Every method refuses every parameter it does not take, naming both, and
// accepts every one it takes.
func TestEveryMethodRefusesTheParametersItDoesNotTake(t *testing.T) {
	for _, m := range Methods() {
		for _, p := range Params() {
			name := p.Name
			c := Combine{CombinationType: m.Name}
			if m.NeedsDensity() {
				c.Density = new(float64)
				*c.Density = 0.5
			}
			withParam(&c, name)
			err := c.Validate()
			if m.takes(name) {
				assert.NoError(t, err, "%s with %s", m.Name, name)
				continue
			}
			require.Error(t, err, "%s with %s", m.Name, name)
			assert.Contains(t, err.Error(), fmt.Sprintf("%s: combination_type %q does not take %s (it takes: ", name, m.Name, name))
			assert.Equal(t, errs.KindValue, errs.KindOf(err))
		}
	}
}

// PEFT's defaults (svd_full_matrices=True, majority_sign_method="total"),
// which PEFT's callers pass along, are not settings.
func TestPEFTDefaultsAreNotRefused(t *testing.T) {
	full := true
	c := Combine{CombinationType: "cat", SVDFullMatrices: &full, MajoritySignMethod: "total"}
	require.NoError(t, c.Validate())
}

func TestSeedIsAParameterOfTheRandomMethods(t *testing.T) {
	for _, m := range Methods() {
		assert.Equal(t, m.Random, m.takes("seed"), m.Name)
	}
}
