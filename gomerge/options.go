package gomerge

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"path/filepath"
	"slices"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/kernels"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/safetensors"
)

// Combine are the arguments that choose and tune the merge method, shared
// by directory merges (Options) and in-memory merges (MemRequest). The
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

// Options are the arguments of a merge of adapter directories; the result
// is written to OutputDir.
type Options struct {
	Adapters []string `json:"adapters"`
	// Weights has one weight per adapter: a number, or module-name patterns
	// with their weights (Weight).
	Weights     adapter.Weights `json:"weights"`
	AdapterName string          `json:"adapter_name"`
	Combine
	OutputDir      string   `json:"output_dir"`
	Overwrite      bool     `json:"overwrite"`
	SourceNames    []string `json:"source_names"`    // how the user named the adapters (for the model card)
	ModelCard      *bool    `json:"model_card"`      // write README.md (default true)
	AllowNonFinite bool     `json:"allow_nonfinite"` // merge NaN / Inf values instead of refusing them
	DType          string   `json:"dtype"`           // "" keeps adapter 0's dtype
	Workers        int      `json:"workers"`         // 0 uses all cores
}

// Result describes a finished merge.
type Result struct {
	OutputDir       string   `json:"output_dir"`
	AdapterName     string   `json:"adapter_name"`
	CombinationType string   `json:"combination_type"`
	Rank            int      `json:"rank"`
	Modules         int      `json:"modules"`
	DType           string   `json:"dtype"`
	Seconds         float64  `json:"seconds"`
	Seed            *uint64  `json:"seed"` // the seed of DARE's masks; nil for other types
	Warnings        []string `json:"warnings"`
	// ModuleRanks is each module's rank; with mixed ranks the adapter's r
	// is the largest, the others are in its rank_pattern.
	ModuleRanks map[string]int `json:"module_ranks"`
	// ModuleErrors is, for merges that factorise each module's combined
	// update (svd, the *_svd types, cat and task_arithmetic), the relative
	// Frobenius error ||D - B'A'|| / ||D|| of that factorisation (0: exact).
	ModuleErrors map[string]float64 `json:"module_errors"`
}

// validate checks the options before any file is read.
func (o *Options) validate() error {
	if len(o.Adapters) == 0 {
		return errs.Value("adapters: at least one adapter directory is required")
	}
	if len(o.Weights) != len(o.Adapters) {
		return errs.Value("weights: got %d weights for %d adapters; pass one weight per adapter", len(o.Weights), len(o.Adapters))
	}
	// compiled into a copy: the caller's Options may be shared by merges running at once
	weights := make(adapter.Weights, len(o.Weights))
	for i, w := range o.Weights {
		var err error
		if weights[i], err = w.Compile(i); err != nil {
			return err
		}
	}
	o.Weights = weights
	seen := map[string]int{}
	for i, a := range o.Adapters {
		if j, ok := seen[filepath.Clean(a)]; ok {
			return errs.Value("adapters: %s is listed twice (positions %d and %d)", a, j, i)
		}
		seen[filepath.Clean(a)] = i
	}
	if err := o.Validate(); err != nil {
		return err
	}
	if o.DType != "" {
		if _, err := safetensors.ParseDType(o.DType); err != nil {
			return err
		}
	}
	if o.OutputDir == "" {
		return errs.Value("output_dir: a directory to write the merged adapter to is required")
	}
	out := filepath.Clean(o.OutputDir)
	for _, a := range o.Adapters {
		if filepath.Clean(a) == out {
			return errs.Value("output_dir: %s is also an input adapter; choose another directory", o.OutputDir)
		}
	}
	return nil
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

// energyRanks reports whether each module's rank is chosen from its
// spectrum (the energy rule, or a span method's rank of its merged update),
// so that the output's shapes are known only after the merge.
func (o *Combine) energyRanks() bool {
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
func (o *Combine) weighted(srcs []source) []source {
	l := o.lambda()
	if l == 1 {
		return srcs
	}
	srcs = slices.Clone(srcs)
	for i := range srcs {
		srcs[i].weight *= l
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

// prepareRandomness draws a fresh seed for DARE when none was given (and
// clears it for the other types); it returns PEFT's density warning.
func (o *Combine) prepareRandomness() []string {
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
