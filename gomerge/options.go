package gomerge

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"math"
	"path/filepath"
	"strings"

	"gomerge/gomerge/kernels"
	"gomerge/gomerge/safetensors"
)

// Combine are the arguments that choose and tune the merge method, shared
// by directory merges (Options) and in-memory merges (MemRequest). The
// names and meanings follow PEFT's LoraModel.add_weighted_adapter; the
// method table (methods.go) says which method reads which.
type Combine struct {
	CombinationType    string    `json:"combination_type"`
	SVDRank            *RankSpec `json:"svd_rank"` // a rank, or the energy rule "energy:F"
	MaxRank            *int      `json:"max_rank"` // cap of each module's rank
	SVDClamp           *float64  `json:"svd_clamp"`
	SVDFullMatrices    *bool     `json:"svd_full_matrices"`
	SVDDriver          *string   `json:"svd_driver"`
	Density            *float64  `json:"density"`
	MajoritySignMethod string    `json:"majority_sign_method"`
	Seed               *uint64   `json:"seed"`            // DARE's random seed; nil draws a fresh one
	Lambda             *float64  `json:"lambda"`          // task_arithmetic's scale of the summed updates (default 1)
	Gamma              *float64  `json:"gamma"`           // breadcrumbs: fraction of largest magnitudes dropped (0.01)
	Epsilon            *float64  `json:"epsilon"`         // della: spread of the keep-probabilities around density (0.15)
	Scaling            *float64  `json:"scaling"`         // span methods (iso_c, tsv, ...): scale of the merged update (1)
	CommonFraction     *float64  `json:"common_fraction"` // iso_cts: share of the common subspace (0.8)

	method Method // the row of CombinationType, set by Validate
}

// Options are the arguments of a merge of adapter directories; the result
// is written to OutputDir.
type Options struct {
	Adapters []string `json:"adapters"`
	// Weights has one weight per adapter: a number, or module-name patterns
	// with their weights (Weight).
	Weights     Weights `json:"weights"`
	AdapterName string  `json:"adapter_name"`
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
		return valueErr("adapters: at least one adapter directory is required")
	}
	if len(o.Weights) != len(o.Adapters) {
		return valueErr("weights: got %d weights for %d adapters; pass one weight per adapter", len(o.Weights), len(o.Adapters))
	}
	// compiled into a copy: the caller's Options may be shared by merges running at once
	weights := make(Weights, len(o.Weights))
	for i, w := range o.Weights {
		var err error
		if weights[i], err = w.compile(i); err != nil {
			return err
		}
	}
	o.Weights = weights
	seen := map[string]int{}
	for i, a := range o.Adapters {
		if j, ok := seen[filepath.Clean(a)]; ok {
			return valueErr("adapters: %s is listed twice (positions %d and %d)", a, j, i)
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
		return valueErr("output_dir: a directory to write the merged adapter to is required")
	}
	out := filepath.Clean(o.OutputDir)
	for _, a := range o.Adapters {
		if filepath.Clean(a) == out {
			return valueErr("output_dir: %s is also an input adapter; choose another directory", o.OutputDir)
		}
	}
	return nil
}

// Validate checks the combination arguments against the method
// table (shared by the directory and the in-memory merges) and resolves the
// method.
func (o *Combine) Validate() error {
	if o.CombinationType == "" {
		o.CombinationType = "svd"
	}
	m, err := LookupMethod(o.CombinationType)
	if err != nil {
		return err
	}
	o.method = m
	// every parameter is refused by the methods that do not read it (the table's Params), from the API, the
	// command line and recipes alike; PEFT's drop-in passes only what the method takes, as PEFT ignores the rest
	for _, name := range o.setParams() {
		if !m.takes(name) {
			takes := "none of them"
			if len(m.Params) > 0 {
				takes = strings.Join(m.Params, ", ")
			}
			return valueErr("%s: combination_type %q does not take %s (it takes: %s)", name, m.Name, name, takes)
		}
	}
	if m.NeedsDensity() {
		if o.Density == nil {
			return valueErr("density: combination_type %q needs a density (the fraction of values kept, in [0, 1])", o.CombinationType)
		}
		d := *o.Density
		if math.IsNaN(d) || d < 0 || d > 1 {
			return valueErr("density: must be in [0, 1], got %v", d)
		}
		if d == 0 && m.Pruning == PruneDARE {
			return valueErr("density: %q rescales kept values by 1/density and needs density > 0", o.CombinationType)
		}
	}
	if o.Lambda != nil && (math.IsNaN(*o.Lambda) || math.IsInf(*o.Lambda, 0)) {
		return valueErr("lambda: %v is not a finite number", *o.Lambda)
	}
	if err := o.validateRank(); err != nil {
		return err
	}
	if o.SVDClamp != nil && (*o.SVDClamp < 0 || *o.SVDClamp > 1 || math.IsNaN(*o.SVDClamp)) {
		return valueErr("svd_clamp: must be a quantile in [0, 1] or None, got %v", *o.SVDClamp)
	}
	if o.SVDDriver != nil {
		switch *o.SVDDriver {
		case "gesvd", "gesvdj", "gesvda":
		default:
			return valueErr("svd_driver: invalid value %q (expected None, 'gesvd', 'gesvdj' or 'gesvda')", *o.SVDDriver)
		}
	}
	if o.MajoritySignMethod == "" {
		o.MajoritySignMethod = "total"
	}
	if o.MajoritySignMethod != "total" && o.MajoritySignMethod != "frequency" {
		return valueErr("majority_sign_method: invalid value %q (expected 'total' or 'frequency')", o.MajoritySignMethod)
	}
	if err := o.validateSpan(); err != nil {
		return err
	}
	return o.validateGeneralized()
}

// setParams lists the combination arguments that are set: given, and for
// the two that PEFT's signature gives a default (svd_full_matrices=True,
// majority_sign_method="total"), given another value.
func (o *Combine) setParams() []string {
	var set []string
	for _, p := range []struct {
		name string
		set  bool
	}{
		{"svd_rank", o.SVDRank != nil}, {"max_rank", o.MaxRank != nil}, {"svd_clamp", o.SVDClamp != nil},
		{"svd_full_matrices", o.SVDFullMatrices != nil && !*o.SVDFullMatrices}, {"svd_driver", o.SVDDriver != nil},
		{"density", o.Density != nil},
		{"majority_sign_method", o.MajoritySignMethod != "" && o.MajoritySignMethod != kernels.SignTotal},
		{"seed", o.Seed != nil}, {"lambda", o.Lambda != nil}, {"gamma", o.Gamma != nil}, {"epsilon", o.Epsilon != nil},
		{"scaling", o.Scaling != nil}, {"common_fraction", o.CommonFraction != nil},
	} {
		if p.set {
			set = append(set, p.name)
		}
	}
	return set
}

// validateRank checks svd_rank and max_rank against the method.
func (o *Combine) validateRank() error {
	if o.MaxRank != nil && *o.MaxRank <= 0 {
		return valueErr("max_rank: must be a positive integer or None, got %d", *o.MaxRank)
	}
	r := o.SVDRank
	if r == nil {
		return nil
	}
	if r.Energy == 0 && r.Fixed <= 0 {
		return valueErr("svd_rank: must be a positive integer, an energy rule such as \"energy:0.99\", or None, got %d", r.Fixed)
	}
	// the methods that take svd_rank factorise their result: exactly (svd, task_arithmetic, the span methods), or
	// a pruned dense update by a randomized SVD, which has no exact spectrum for the energy rule
	if r.Energy > 0 && o.method.family(o.SVDRank) == FamilyDenseSVD {
		return valueErr("svd_rank: the energy rule needs the exact spectrum, and combination_type %q factorises a pruned "+
			"dense update by a randomized SVD: give an integer svd_rank", o.CombinationType)
	}
	return nil
}

// rankRule is the rule that gives each module's rank for the merged
// adapter's rank (a fixed rank when svd_rank is not an energy rule).
func (o *Combine) rankRule(rank int) rankRule {
	if o.SVDRank != nil && o.SVDRank.Energy > 0 {
		r := rankRule{energy: o.SVDRank.Energy}
		if o.MaxRank != nil {
			r.max = *o.MaxRank
		}
		return r
	}
	return rankRule{fixed: rank}
}

// energyRanks reports whether each module's rank is chosen from its
// spectrum (the energy rule, or a span method's rank of its merged update),
// so that the output's shapes are known only after the merge.
func (o *Combine) energyRanks() bool {
	return o.SVDRank != nil && o.SVDRank.Energy > 0 || o.spanRanks()
}

// lambda is the scale of the combined updates (1 unless the method takes
// lambda and it was given).
func (o *Combine) lambda() float64 {
	if o.Lambda == nil {
		return 1
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
