package extract

import (
	"context"
	"fmt"
	"math"
	"slices"
	"sort"
	"strings"
	"time"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// Options are the arguments of Extract: a LoRA adapter extracted
// from the difference between a fine-tuned model and its base.
type Options struct {
	Base      string `json:"base"`      // the base model folder
	Finetuned string `json:"finetuned"` // the fine-tuned model folder
	OutputDir string `json:"output_dir"`
	// Rank is every module's rank, or the energy rule "energy:F": each
	// module gets the smallest rank keeping the fraction F of ||dW||^2.
	Rank    *linalg.RankSpec `json:"rank"`
	MaxRank *int             `json:"max_rank"` // cap of every module's rank
	// SaveModules names modules saved whole into modules_to_save (a module
	// path, or the last part of one: "lm_head", "embed_tokens", "norm");
	// a linear module named here is saved whole instead of factorised.
	SaveModules []string `json:"save_modules"`
	// SaveChanged saves every changed module that is not factorised
	// (norms, embeddings, lm_head, biases of other layers) into
	// modules_to_save.
	SaveChanged bool    `json:"save_changed"`
	Seed        *uint64 `json:"seed"`  // seed of the randomized SVD (default 0)
	DType       string  `json:"dtype"` // of the LoRA factors; default float32
	Overwrite   bool    `json:"overwrite"`
	Workers     int     `json:"workers"` // modules factorised at once; 0: all cores
	ModelCard   *bool   `json:"model_card"`
	// BaseName and FinetunedName are how the user named the models (for
	// the config's base_model_name_or_path and the card); default the paths.
	BaseName      string `json:"base_name"`
	FinetunedName string `json:"finetuned_name"`
}

// Result describes a finished extraction.
type Result struct {
	OutputDir string  `json:"output_dir"`
	Rank      int     `json:"rank"`    // r: the largest module rank
	Modules   int     `json:"modules"` // LoRA modules written
	DType     string  `json:"dtype"`
	Seconds   float64 `json:"seconds"`
	Seed      uint64  `json:"seed"`
	// Warnings are changed tensors that the adapter does not carry.
	Warnings    []string       `json:"warnings"`
	ModuleRanks map[string]int `json:"module_ranks"`
	// ModuleErrors is each module's relative Frobenius error
	// ||dW - B A|| / ||dW||.
	ModuleErrors map[string]float64 `json:"module_errors"`
	// Unchanged lists the linear modules with dW = 0, which were skipped.
	Unchanged []string `json:"unchanged"`
	// ModulesToSave lists the modules saved whole (PEFT's modules_to_save).
	ModulesToSave []string `json:"modules_to_save"`
}

func (o *Options) validate() (linalg.RankRule, safetensors.DType, error) {
	if o.Base == "" || o.Finetuned == "" {
		return linalg.RankRule{}, "", errs.Value("extract: base and finetuned model folders are required")
	}
	if o.OutputDir == "" {
		return linalg.RankRule{}, "", errs.Value("output_dir: a directory to write the extracted adapter to is required")
	}
	if err := atomicdir.CheckApart(o.OutputDir, []string{o.Base, o.Finetuned}, "input model folder"); err != nil {
		return linalg.RankRule{}, "", err
	}
	if o.Rank == nil {
		return linalg.RankRule{}, "", errs.Value("extract: give a rank (an integer) or an energy fraction")
	}
	rule := linalg.RankRule{Fixed: o.Rank.Fixed, Energy: o.Rank.Energy}
	if o.Rank.Energy == 0 && o.Rank.Fixed <= 0 {
		return linalg.RankRule{}, "", errs.Value("rank: %d must be a positive integer", o.Rank.Fixed)
	}
	if o.Rank.Energy != 0 && (o.Rank.Energy <= 0 || o.Rank.Energy > 1 || math.IsNaN(o.Rank.Energy)) {
		return linalg.RankRule{}, "", errs.Value("energy: %g must be in (0, 1]", o.Rank.Energy)
	}
	if o.MaxRank != nil {
		if *o.MaxRank <= 0 {
			return linalg.RankRule{}, "", errs.Value("max_rank: %d must be a positive integer", *o.MaxRank)
		}
		rule.Max = *o.MaxRank
	}
	if o.Workers < 0 {
		return linalg.RankRule{}, "", errs.Value("workers: %d must be positive (0 uses all cores)", o.Workers)
	}
	dt := safetensors.F32
	if o.DType != "" {
		var err error
		if dt, err = safetensors.ParseDType(o.DType); err != nil {
			return linalg.RankRule{}, "", err
		}
	}
	for _, s := range o.SaveModules {
		if strings.TrimSpace(s) == "" {
			return linalg.RankRule{}, "", errs.Value("save_modules: an empty module name")
		}
	}
	return rule, dt, nil
}

// Extract extracts a LoRA adapter from a fine-tuned model: for every linear
// module, dW = W_ft - W_base in float32 is factorised as B A by a seeded
// randomized SVD (RandomizedSVD's range finder: the same seed gives the
// same bytes on any number of cores), at a fixed rank or by the energy
// rule; modules are read one at a time per worker and factorised in
// parallel. The adapter (lora_alpha = r, so that PEFT's scaling is 1; mixed
// ranks in rank_pattern / alpha_pattern; B = U S, A = V^T) is written
// atomically with a model card that gives each module's relative error.
// Changed tensors of other modules (norms, embeddings, lm_head) go into
// modules_to_save when asked. progress may be nil; ctx cancels (nothing is
// written).
func Extract(ctx context.Context, opts Options, progress *parallel.Progress) (*Result, error) {
	start := time.Now()
	rule, dt, err := opts.validate()
	if err != nil {
		return nil, err
	}
	if err := adapter.CheckOutput(opts.OutputDir, opts.Overwrite); err != nil {
		return nil, err
	}
	defer parallel.HoldGCHeadroom()()
	base, err := modelfolder.Open(opts.Base)
	if err != nil {
		return nil, err
	}
	defer base.Close()
	ft, err := modelfolder.Open(opts.Finetuned)
	if err != nil {
		return nil, err
	}
	defer ft.Close()
	jobs, err := planExtraction(opts, base, ft)
	if err != nil {
		return nil, err
	}
	seed := uint64(0)
	if opts.Seed != nil {
		seed = *opts.Seed
	}
	outcomes, err := runExtractJobs(ctx, opts, jobs, base, ft, rule, dt, seed, progress)
	if err != nil {
		return nil, err
	}
	res, files, err := collect(opts, jobs, outcomes, dt, seed)
	if err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, errs.ErrCancelled
	}
	if err := write(ctx, opts, base, rule, res, files); err != nil {
		return nil, err
	}
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// adapterFiles is what the extracted adapter's files are made of: its
// tensors and their bytes, and the factorised modules with their ranks.
type adapterFiles struct {
	outs    []safetensors.OutTensor
	data    [][]byte
	targets []string       // the factorised modules (target_modules)
	ranks   []int          // their ranks
	params  []string       // the expert parameters (target_parameters entries)
	pranks  map[string]int // the rank per expert of each expert parameter (by its path)
	fanIn   bool           // a factorised weight is stored in x out (Conv1D)
}

// collect gathers the jobs' outcomes into the result (ranks, errors,
// modules saved whole or unchanged, a warning naming the changed modules
// the adapter cannot carry) and the adapter's files; it refuses an
// extraction with no changed linear module.
func collect(opts Options, jobs []extractJob, outcomes []extractOutcome, dt safetensors.DType, seed uint64) (*Result, *adapterFiles, error) {
	res := &Result{
		OutputDir: opts.OutputDir, DType: dt.TorchName(), Seed: seed, Warnings: []string{},
		ModuleRanks: map[string]int{}, ModuleErrors: map[string]float64{}, Unchanged: []string{}, ModulesToSave: []string{},
	}
	f := &adapterFiles{}
	var notCarried []string
	for i, j := range jobs {
		o := &outcomes[i]
		switch {
		case j.expert != nil:
			if f.pranks == nil {
				f.pranks = map[string]int{}
			}
			f.pranks[j.expert.param] = o.rank
			if !slices.Contains(f.params, j.expert.target) {
				f.params = append(f.params, j.expert.target)
			}
			res.ModuleRanks[j.expert.param] = o.rank
			if o.changed {
				res.ModuleErrors[j.expert.param] = o.relErr
			} else {
				res.Unchanged = append(res.Unchanged, j.expert.param)
			}
		case j.lora && o.changed:
			f.targets = append(f.targets, j.module)
			f.ranks = append(f.ranks, o.rank)
			res.ModuleRanks[j.module] = o.rank
			res.ModuleErrors[j.module] = o.relErr
		case j.lora:
			res.Unchanged = append(res.Unchanged, j.module)
		case o.tensors != nil:
			res.ModulesToSave = append(res.ModulesToSave, j.module)
		case o.changed:
			notCarried = append(notCarried, j.module)
		}
		f.outs = append(f.outs, o.tensors...)
		f.data = append(f.data, o.data...)
		f.fanIn = f.fanIn || (j.lora && j.fanIn)
	}
	if len(notCarried) > 0 {
		res.Warnings = append(res.Warnings, fmt.Sprintf("%d changed module(s) are not in the adapter, whose LoRA factors "+
			"carry linear weights only (modules_to_save saves norms, embeddings or lm_head whole; biases of factorised "+
			"layers cannot be carried): %s", len(notCarried), strings.Join(notCarried, ", ")))
	}
	if len(f.targets) == 0 && len(res.ModuleErrors) == 0 {
		return nil, nil, errs.Value("extract: no linear module of %s differs from %s; there is nothing to factorise", opts.Finetuned, opts.Base)
	}
	res.Modules = len(f.targets) + len(f.pranks)
	for _, r := range f.pranks {
		res.Rank = max(res.Rank, r)
	}
	if len(f.ranks) > 0 {
		res.Rank = max(res.Rank, slices.Max(f.ranks))
	}
	sort.Strings(f.params)
	return res, f, nil
}
