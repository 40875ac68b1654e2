package gomerge

import (
	"context"
	"crypto/rand"
	"encoding/binary"
	"fmt"
	"math"
	"path/filepath"
	"regexp"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"time"
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

// Progress counts merged modules; it is safe to read while a merge runs.
type Progress struct {
	Done  atomic.Int64
	Total atomic.Int64
}

// source is one adapter's module with its user weight and the adapter's
// position in the merge (which labels its random streams).
type source struct {
	weight float64
	mod    *Module
	index  int
	// Optional DARE keep-masks (one byte per element, non-zero keeps), given
	// by the caller instead of gomerge's generator: for A, B and dW.
	maskA, maskB, maskDW []byte
	// roundDW rounds the dense update to this dtype, as PEFT's
	// get_delta_weight does for half-precision factors ("" or F32: no rounding).
	roundDW DType
}

// moduleJob is the work for one output module.
type moduleJob struct {
	name string
	kind ModuleKind
	srcs []source
	in   int
	out  int
	// shapes of A and B without the rank, for the output tensors
	aTail []int
	bTail []int
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

// Merge runs a merge end to end: validate, read the adapters, merge every
// module in parallel and write the output directory atomically. progress may
// be nil; ctx cancels the merge (no output is left behind).
func Merge(ctx context.Context, opts Options, progress *Progress) (*Result, error) {
	start := time.Now()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if err := checkOutputDir(opts.OutputDir, opts.Overwrite); err != nil {
		return nil, err
	}
	defer holdGCHeadroom()()
	res := &Result{OutputDir: opts.OutputDir, AdapterName: opts.AdapterName, Warnings: []string{}}
	if len(opts.Adapters) == 1 && opts.CombinationType != "linear" {
		res.Warnings = append(res.Warnings, fmt.Sprintf(
			"one adapter only: combination_type %q is replaced by \"linear\", as PEFT does", opts.CombinationType))
		opts.CombinationType = "linear"
	}
	res.CombinationType = opts.CombinationType
	res.Warnings = append(res.Warnings, opts.prepareRandomness()...)
	res.Seed = opts.Seed

	adapters, err := loadAll(opts.Adapters)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, a := range adapters {
			a.Close()
		}
	}()
	for _, a := range adapters {
		a.file.AllowNonFinite = opts.AllowNonFinite
	}
	for i, dir := range opts.Adapters {
		a := adapters[i]
		if len(a.Extra) > 0 {
			res.Warnings = append(res.Warnings, fmt.Sprintf(
				"%s: %d tensor(s) that are not LoRA factors were left out of the merge (first: %s)", dir, len(a.Extra), a.Extra[0]))
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, ErrCancelled
	}
	outDType := adapters[0].DType
	if opts.DType != "" {
		outDType, _ = ParseDType(opts.DType)
	}
	res.DType = outDType.TorchName()

	rank, err := newRank(opts, adapters)
	if err != nil {
		return nil, err
	}
	res.Rank = rank
	cfgs := make([]*AdapterConfig, len(adapters))
	for i, a := range adapters {
		cfgs[i] = a.Config
	}
	targets, err := UnionTargetModules(cfgs, opts.Adapters)
	if err != nil {
		return nil, err
	}
	jobs, err := planModules(opts, adapters)
	if err != nil {
		return nil, err
	}
	res.Modules = len(jobs)
	if opts.Workers, err = planWorkers(opts, jobs, availableMemory()); err != nil {
		return nil, err
	}

	if err := ctx.Err(); err != nil {
		return nil, ErrCancelled
	}
	pending, err := beginAdapterDir(opts.OutputDir, opts.Overwrite)
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if !committed {
			pending.abort()
		}
	}()
	// Every output tensor is known before merging: write the header first, then each module as it is done,
	// so that results never pile up in memory.
	w, err := CreateSafetensors(pending.path(WeightsFile), outputTensors(opts, jobs, rank, outDType), map[string]string{"format": "pt"})
	if err != nil {
		return nil, err
	}
	ranks, err := runJobs(ctx, opts, jobs, rank, outDType, progress, func(_ int, aName, bName string, a, b RawTensor) error {
		if err := w.WriteTensor(aName, a.Data); err != nil {
			return err
		}
		return w.WriteTensor(bName, b.Data)
	})
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, err
	}
	if err := writeConfigAndCard(pending, opts, res, adapters[0].Config, targets, rankPattern(jobs, ranks, rank)); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, ErrCancelled
	}
	if err := pending.commit(opts.Overwrite); err != nil {
		return nil, err
	}
	committed = true
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// outputTensors lists the merged adapter's tensors: every module's A and B
// at the merged rank (the module's own rank for factor-wise merges).
func outputTensors(opts Options, jobs []moduleJob, rank int, dt DType) []OutTensor {
	outs := make([]OutTensor, 0, 2*len(jobs))
	for i := range jobs {
		j := &jobs[i]
		r := rank
		if isFactorFamily(opts.CombinationType) {
			r = j.srcs[0].mod.Rank
		}
		aName, bName := moduleKeys(j.name, j.kind)
		outs = append(outs, OutTensor{aName, dt, append([]int{r}, j.aTail...)},
			OutTensor{bName, dt, append([]int{j.out, r}, j.bTail...)})
	}
	return outs
}

// writeConfigAndCard writes adapter_config.json (with a rank pattern for
// modules whose rank differs) and, unless turned off, the README.md card.
func writeConfigAndCard(pending *pendingDir, opts Options, res *Result, base *AdapterConfig, targets TargetModules, pattern Patterns) error {
	cfgJSON, err := MergedConfigJSON(base, res.Rank, targets, pattern, append(Patterns(nil), pattern...), nil)
	if err != nil {
		return err
	}
	if err := writeFileSync(pending.path(ConfigFile), cfgJSON); err != nil {
		return err
	}
	if opts.ModelCard != nil && !*opts.ModelCard {
		return nil
	}
	names := opts.SourceNames
	if len(names) != len(opts.Adapters) {
		names = opts.Adapters
	}
	return writeFileSync(pending.path("README.md"), []byte(ModelCard(opts, res, base.BaseModel, names)))
}

// loadAll reads the adapter directories in parallel; the first error in
// argument order wins.
func loadAll(dirs []string) ([]*Adapter, error) {
	adapters := make([]*Adapter, len(dirs))
	errs := make([]error, len(dirs))
	parallelFor(len(dirs), 1, func(lo, hi int) {
		for i := lo; i < hi; i++ {
			adapters[i], errs[i] = LoadAdapter(dirs[i])
		}
	})
	for _, err := range errs {
		if err != nil {
			for _, a := range adapters {
				if a != nil {
					a.Close()
				}
			}
			return nil, err
		}
	}
	return adapters, nil
}

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

// newRank is PEFT's rank of the merged adapter.
func newRank(opts Options, adapters []*Adapter) (int, error) {
	ranks := make([]int, len(adapters))
	for i, a := range adapters {
		ranks[i] = a.Config.MaxRank()
	}
	switch t := opts.CombinationType; {
	case isFactorFamily(t):
		for i, r := range ranks {
			if r != ranks[0] {
				return 0, valueErr("All adapters must have the same r value when using combination_type %s: "+
					"%s has r=%d, %s has r=%d (use cat or svd for adapters of different ranks)",
					t, opts.Adapters[0], ranks[0], opts.Adapters[i], r)
			}
		}
		return ranks[0], nil
	case t == "cat":
		sum := 0
		for _, r := range ranks {
			sum += r
		}
		return sum, nil
	default: // *svd
		if opts.SVDRank != nil {
			return *opts.SVDRank, nil
		}
		return maxInt(ranks), nil
	}
}

func maxInt(x []int) int {
	m := x[0]
	for _, v := range x[1:] {
		m = max(m, v)
	}
	return m
}

// planModules pairs every module with the adapters that have it and checks
// that their shapes agree.
func planModules(opts Options, adapters []*Adapter) ([]moduleJob, error) {
	byName := map[string]*moduleJob{}
	var names []string
	first := map[string]int{}
	for i, a := range adapters {
		for _, name := range a.Order {
			m := a.Modules[name]
			j := byName[name]
			if j == nil {
				j = &moduleJob{name: name, kind: m.Kind, in: m.In(), out: m.Out(),
					aTail: m.RawA.Shape[1:], bTail: m.RawB.Shape[2:]}
				byName[name] = j
				names = append(names, name)
				first[name] = i
			} else {
				f := adapters[first[name]].Modules[name]
				if m.Kind != j.kind || !equalInts(m.RawA.Shape[1:], j.aTail) || m.Out() != j.out || len(m.RawB.Shape) != len(f.RawB.Shape) {
					return nil, valueErr("module %s: shapes differ between adapters: %s has lora_A %v / lora_B %v, %s has lora_A %v / lora_B %v",
						name, opts.Adapters[first[name]], f.RawA.Shape, f.RawB.Shape, opts.Adapters[i], m.RawA.Shape, m.RawB.Shape)
				}
				if isFactorFamily(opts.CombinationType) && m.Rank != f.Rank {
					return nil, valueErr("module %s: combination_type %s needs equal ranks, but %s has rank %d and %s has rank %d",
						name, opts.CombinationType, opts.Adapters[first[name]], f.Rank, opts.Adapters[i], m.Rank)
				}
			}
			j.srcs = append(j.srcs, source{weight: opts.Weights[i], mod: m, index: i})
		}
	}
	sort.Strings(names)
	jobs := make([]moduleJob, len(names))
	for i, n := range names {
		jobs[i] = *byName[n]
	}
	return jobs, nil
}

func equalInts(a, b []int) bool {
	if len(a) != len(b) {
		return false
	}
	for i := range a {
		if a[i] != b[i] {
			return false
		}
	}
	return true
}

// emitFunc receives the merged tensors of job i; it may be called from
// several goroutines at once.
type emitFunc func(i int, aName, bName string, a, b RawTensor) error

// runJobs merges the modules on all cores, hands each result to emit and
// returns each module's merged rank.
func runJobs(ctx context.Context, opts Options, jobs []moduleJob, rank int, dt DType, progress *Progress, emit emitFunc) ([]int, error) {
	if progress != nil {
		progress.Total.Store(int64(len(jobs)))
	}
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	ranks := make([]int, len(jobs))
	var next atomic.Int64
	var errOnce sync.Once
	var firstErr error
	var failed atomic.Bool
	var wg sync.WaitGroup
	for w := 0; w < min(workers, len(jobs)); w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= len(jobs) || ctx.Err() != nil || failed.Load() {
					return
				}
				aName, bName, a, b, r, err := mergeModule(ctx, opts, &jobs[i], rank, dt)
				if err == nil {
					err = emit(i, aName, bName, a, b)
				}
				if err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
				ranks[i] = r
				if progress != nil {
					progress.Done.Add(1)
				}
				gcTune()
			}
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return nil, ErrCancelled
	}
	return ranks, firstErr
}

// rankPattern lists, for modules whose rank differs from the adapter's, a
// pattern matching exactly that module.
func rankPattern(jobs []moduleJob, ranks []int, rank int) Patterns {
	var pattern Patterns
	for i, j := range jobs {
		if ranks[i] != rank {
			pattern = append(pattern, PatternEntry{Key: regexp.QuoteMeta(j.name), Value: float64(ranks[i])})
		}
	}
	return pattern
}

// mergeModule merges one module, recovering from panics so that a bug in a
// kernel becomes an error naming the module.
func mergeModule(ctx context.Context, opts Options, j *moduleJob, rank int, dt DType) (aName, bName string, ra, rb RawTensor, r int, err error) {
	defer func() {
		for _, s := range j.srcs {
			s.mod.release()
		}
	}()
	defer func() {
		if p := recover(); p != nil {
			if e, ok := p.(*Error); ok { // a read error raised inside a kernel
				err = e
				return
			}
			err = newErr(KindInternal, "module %s: internal error: %v", j.name, p)
		}
	}()
	var a, b []float32
	comb := Combination{Method: combinationFor(opts.CombinationType), SignMethod: opts.MajoritySignMethod, Density: 1}
	if opts.Density != nil {
		comb.Density = *opts.Density
	}
	var seed uint64
	if opts.Seed != nil {
		seed = *opts.Seed
	}
	switch t := opts.CombinationType; {
	case isFactorFamily(t):
		a, b, r = mergeFactors(j.srcs, comb, seed, j.name)
		if r > rank {
			return "", "", RawTensor{}, RawTensor{}, 0, valueErr("module %s: rank %d is above the adapter's rank %d", j.name, r, rank)
		}
	case t == "cat":
		r = rank
		a, b = mergeCat(j.srcs, r, j.in, j.out)
	case t == "svd":
		r = rank
		a, b = mergeSVD(j.srcs, r, j.in, j.out, opts.SVDClamp)
	default: // ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
		r = rank
		a, b, err = mergeDenseSVD(ctx, j, comb, r, opts.SVDClamp, seed)
		if err != nil {
			return "", "", RawTensor{}, RawTensor{}, 0, err
		}
	}
	aName, bName = moduleKeys(j.name, j.kind)
	aShape := append([]int{r}, j.aTail...)
	bShape := append([]int{j.out, r}, j.bTail...)
	return aName, bName, RawTensor{DType: dt, Shape: aShape, Data: Encode(dt, a)},
		RawTensor{DType: dt, Shape: bShape, Data: Encode(dt, b)}, r, nil
}
