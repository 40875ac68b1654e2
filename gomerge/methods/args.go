package methods

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"slices"

	"gomerge/gomerge/kernels"
	"gomerge/gomerge/linalg"
)

// Combine are the arguments that choose and tune the merge method, shared
// by the directory merges, the in-memory merges and the merges before a fuse. The
// names and meanings follow PEFT's LoraModel.add_weighted_adapter; the
// method table (methods.go) says which method reads which.
type Combine struct {
	CombinationType    string           `json:"combination_type"`
	SVDRank            *linalg.RankSpec `json:"svd_rank"` // a rank, or the energy rule "energy:F"
	MaxRank            *int             `json:"max_rank"` // cap of each module's rank
	SVDClamp           *float64         `json:"svd_clamp"`
	SVDFullMatrices    *bool            `json:"svd_full_matrices"`
	SVDDriver          *string          `json:"svd_driver"`
	Density            *float64         `json:"density"`
	MajoritySignMethod string           `json:"majority_sign_method"`
	Seed               *uint64          `json:"seed"`            // DARE's random seed; nil draws a fresh one
	Lambda             *float64         `json:"lambda"`          // task_arithmetic's scale of the summed updates (default 1)
	Gamma              *float64         `json:"gamma"`           // breadcrumbs: fraction of largest magnitudes dropped (0.01)
	Epsilon            *float64         `json:"epsilon"`         // della: spread of the keep-probabilities around density (0.15)
	Scaling            *float64         `json:"scaling"`         // span methods (iso_c, tsv, ...): scale of the merged update (1)
	CommonFraction     *float64         `json:"common_fraction"` // iso_cts: share of the common subspace (0.8)

	method Method // the row of CombinationType, set by Validate
}

// Validate checks the combination arguments against the method table and
// the parameter schema (shared by the directory and the in-memory merges)
// and resolves the method: every parameter is refused by the methods that
// do not take it (the table's Params), from the API, the command line and
// recipes alike (PEFT's drop-in passes only what the method takes, as PEFT
// ignores the rest), and each one the method takes is checked by its
// schema entry.
func (o *Combine) Validate() error {
	if o.CombinationType == "" {
		o.CombinationType = "svd"
	}
	m, err := LookupMethod(o.CombinationType)
	if err != nil {
		return err
	}
	o.method = m
	if err := o.checkParams(); err != nil {
		return err
	}
	if o.MajoritySignMethod == "" {
		o.MajoritySignMethod = kernels.SignTotal
	}
	return nil
}

// linalg.RankRule is the rule that gives each module's rank for the merged
// adapter's rank (a fixed rank when svd_rank is not an energy rule).
func (o *Combine) rankRule(rank int) linalg.RankRule {
	if o.SVDRank != nil && o.SVDRank.Energy > 0 {
		r := linalg.RankRule{Energy: o.SVDRank.Energy}
		if o.MaxRank != nil {
			r.Max = *o.MaxRank
		}
		return r
	}
	return linalg.RankRule{Fixed: rank}
}

// EnergyRanks reports whether each module's rank is chosen from its
// spectrum (the energy rule, or a span method's rank of its merged update),
// so that the output's shapes are known only after the merge.
func (o *Combine) EnergyRanks() bool {
	energy := o.SVDRank != nil && o.SVDRank.Energy > 0
	return energy || o.method.Rank.spectral && o.SVDRank == nil
}

// combination is the element-wise step of the method: its row's pruning
// and TIES, with the density (1: none) and the sign election.
func (o *Combine) combination() Combination {
	c := Combination{Pruning: o.method.Pruning, TIES: o.method.TIES, SignMethod: o.MajoritySignMethod, Density: 1}
	if o.Density != nil {
		c.Density = *o.Density
	}
	return c
}

// seed is the seed of the random masks (0 for the methods without).
func (o *Combine) seed() uint64 {
	if o.Seed == nil {
		return 0
	}
	return *o.Seed
}

// weighted returns the sources with lambda, task arithmetic's scale of the
// summed updates, folded into their weights (the sources themselves when
// lambda is 1).
func (o *Combine) weighted(srcs []Source) []Source {
	l := o.lambda()
	if l == 1 {
		return srcs
	}
	srcs = slices.Clone(srcs)
	for i := range srcs {
		srcs[i].Weight *= l
	}
	return srcs
}

// DefaultLambda is the default scale of the summed updates.
const DefaultLambda = 1.0

// lambda is the scale of the combined updates (1 unless the method takes
// lambda and it was given).
func (o *Combine) lambda() float64 {
	if o.Lambda == nil {
		return DefaultLambda
	}
	return *o.Lambda
}

// PrepareRandomness draws a fresh seed for DARE when none was given (and
// clears it for the other types); it returns PEFT's density warning.
func (o *Combine) PrepareRandomness() []string {
	var warnings []string
	if o.method.NeedsDensity() && *o.Density >= 1 {
		warnings = append(warnings, fmt.Sprintf(
			"The density %v is greater than or equal to 1, no pruning will be performed.", *o.Density))
	}
	if !o.method.Random {
		o.Seed = nil
	} else if o.Seed == nil {
		var b [8]byte
		_, _ = rand.Read(b[:])
		seed := binary.LittleEndian.Uint64(b[:]) >> 1 // fits a signed 64-bit integer
		o.Seed = &seed
	}
	return warnings
}

// Method is the row of the combination type, resolved by Validate.
func (o *Combine) Method() Method { return o.method }

// UseMethod replaces the method by the row of name (as PEFT replaces every
// combination type by linear for one adapter), keeping the arguments as
// they were validated.
func (o *Combine) UseMethod(name string) error {
	m, err := LookupMethod(name)
	if err != nil {
		return err
	}
	o.CombinationType, o.method = name, m
	return nil
}

// AdapterRank is the merged adapter's rank by the method's rank rule, from
// the adapters' ranks; names are the adapters, for errors.
func (o *Combine) AdapterRank(ranks []int, names []string) (int, error) {
	return o.method.Rank.adapter(ranks, names, o.method, o)
}
