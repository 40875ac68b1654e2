package gomerge

import (
	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/safetensors"
)

// Options are the arguments of a merge of adapter directories; the result
// is written to OutputDir.
type Options struct {
	Adapters []string `json:"adapters"`
	// Weights has one weight per adapter: a number, or module-name patterns
	// with their weights (Weight).
	Weights     adapter.Weights `json:"weights"`
	AdapterName string          `json:"adapter_name"`
	methods.Combine
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
	// ModuleExperts is, for the modules that adapt a mixture-of-experts
	// parameter (target_parameters), its path and number of experts: their
	// ModuleRanks are ranks per expert, as PEFT's r is.
	ModuleExperts map[string]ModuleExperts `json:"module_experts"`
}

// ModuleExperts is the parameter a module adapts and its number of experts.
type ModuleExperts struct {
	Param   string `json:"param"`
	Experts int    `json:"experts"`
}

// validate checks the options before any file is read.
func (o *Options) validate() error {
	if len(o.Adapters) == 0 {
		return errs.Value("adapters: at least one adapter directory is required")
	}
	weights, err := adapter.CheckSources(o.Adapters, o.Weights)
	if err != nil {
		return err
	}
	o.Weights = weights
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
	return atomicdir.CheckApart(o.OutputDir, o.Adapters, "input adapter")
}
