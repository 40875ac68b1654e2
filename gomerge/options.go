package gomerge

import (
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"math"
	"path/filepath"
	"strings"
)

// Combination types, as PEFT names them.
var combinationTypes = map[string]bool{
	"svd": true, "linear": true, "cat": true, "ties": true, "ties_svd": true, "dare_linear": true,
	"dare_ties": true, "dare_linear_svd": true, "dare_ties_svd": true, "magnitude_prune": true,
	"magnitude_prune_svd": true,
}

// allPEFTTypes lists PEFT's combination types, for error messages.
const allPEFTTypes = "svd, linear, cat, ties, ties_svd, dare_linear, dare_ties, dare_linear_svd, dare_ties_svd, magnitude_prune, magnitude_prune_svd"

// Options are the arguments of a merge. The names and meanings follow
// PEFT's LoraModel.add_weighted_adapter; adapters are directories and the
// result is written to OutputDir.
type Options struct {
	Adapters           []string  `json:"adapters"`
	Weights            []float64 `json:"weights"`
	AdapterName        string    `json:"adapter_name"`
	CombinationType    string    `json:"combination_type"`
	SVDRank            *int      `json:"svd_rank"`
	SVDClamp           *float64  `json:"svd_clamp"`
	SVDFullMatrices    *bool     `json:"svd_full_matrices"`
	SVDDriver          *string   `json:"svd_driver"`
	Density            *float64  `json:"density"`
	MajoritySignMethod string    `json:"majority_sign_method"`
	OutputDir          string    `json:"output_dir"`
	Overwrite          bool      `json:"overwrite"`
	Seed               *uint64   `json:"seed"`            // DARE's random seed; nil draws a fresh one
	SourceNames        []string  `json:"source_names"`    // how the user named the adapters (for the model card)
	ModelCard          *bool     `json:"model_card"`      // write README.md (default true)
	AllowNonFinite     bool      `json:"allow_nonfinite"` // merge NaN / Inf values instead of refusing them
	DType              string    `json:"dtype"`           // "" keeps adapter 0's dtype
	Workers            int       `json:"workers"`         // 0 uses all cores
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
}

// validate checks the options before any file is read.
func (o *Options) validate() error {
	if len(o.Adapters) == 0 {
		return valueErr("adapters: at least one adapter directory is required")
	}
	if len(o.Weights) != len(o.Adapters) {
		return valueErr("weights: got %d weights for %d adapters; pass one weight per adapter", len(o.Weights), len(o.Adapters))
	}
	for i, w := range o.Weights {
		if math.IsNaN(w) || math.IsInf(w, 0) {
			return valueErr("weights[%d]: %v is not a finite number", i, w)
		}
	}
	seen := map[string]int{}
	for i, a := range o.Adapters {
		if j, ok := seen[filepath.Clean(a)]; ok {
			return valueErr("adapters: %s is listed twice (positions %d and %d)", a, j, i)
		}
		seen[filepath.Clean(a)] = i
	}
	if err := o.validateCombination(); err != nil {
		return err
	}
	if o.DType != "" {
		if _, err := ParseDType(o.DType); err != nil {
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

// validateCombination checks the combination arguments (shared by the
// directory and the in-memory merges).
func (o *Options) validateCombination() error {
	if o.CombinationType == "" {
		o.CombinationType = "svd"
	}
	if !combinationTypes[o.CombinationType] {
		return valueErr("combination_type: invalid value %q (expected one of %s)", o.CombinationType, allPEFTTypes)
	}
	if isPruning(o.CombinationType) {
		if o.Density == nil {
			return valueErr("density: combination_type %q needs a density (the fraction of values kept, in [0, 1])", o.CombinationType)
		}
		d := *o.Density
		if math.IsNaN(d) || d < 0 || d > 1 {
			return valueErr("density: must be in [0, 1], got %v", d)
		}
		if d == 0 && isDARE(o.CombinationType) {
			return valueErr("density: %q rescales kept values by 1/density and needs density > 0", o.CombinationType)
		}
	}
	if o.SVDRank != nil && *o.SVDRank <= 0 {
		return valueErr("svd_rank: must be a positive integer or None, got %d", *o.SVDRank)
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
	return nil
}

// isFactorFamily tells PEFT's family 1: merges of the factors, equal ranks.
func isFactorFamily(t string) bool {
	switch t {
	case "linear", "ties", "dare_linear", "dare_ties", "magnitude_prune":
		return true
	}
	return false
}

func isPruning(t string) bool { return t != "linear" && t != "cat" && t != "svd" }

func isDARE(t string) bool { return strings.HasPrefix(t, "dare_") }

// prepareRandomness draws a fresh seed for DARE when none was given (and
// clears it for the other types); it returns PEFT's density warning.
func (o *Options) prepareRandomness() []string {
	var warnings []string
	if isPruning(o.CombinationType) && *o.Density >= 1 {
		warnings = append(warnings, fmt.Sprintf(
			"The density %v is greater than or equal to 1, no pruning will be performed.", *o.Density))
	}
	if !isDARE(o.CombinationType) {
		o.Seed = nil
	} else if o.Seed == nil {
		var b [8]byte
		_, _ = rand.Read(b[:])
		seed := binary.LittleEndian.Uint64(b[:]) >> 1 // fits a signed 64-bit integer
		o.Seed = &seed
	}
	return warnings
}
