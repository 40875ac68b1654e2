package gomerge

import (
	"context"
	"fmt"
	"math"
	"slices"
	"time"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// Merge runs a merge end to end: validate, read the adapters, merge every
// module in parallel and write the output directory atomically. progress may
// be nil; ctx cancels the merge (no output is left behind).
func Merge(ctx context.Context, opts Options, progress *parallel.Progress) (*Result, error) {
	start := time.Now()
	if err := opts.validate(); err != nil {
		return nil, err
	}
	if err := adapter.CheckOutput(opts.OutputDir, opts.Overwrite); err != nil {
		return nil, err
	}
	defer parallel.HoldGCHeadroom()()
	res := &Result{OutputDir: opts.OutputDir, AdapterName: opts.AdapterName, Warnings: []string{}}
	if len(opts.Adapters) == 1 && opts.Method().PEFT && opts.CombinationType != "linear" {
		res.Warnings = append(res.Warnings, fmt.Sprintf(
			"one adapter only: combination_type %q is replaced by \"linear\", as PEFT does", opts.CombinationType))
		if err := opts.UseMethod("linear"); err != nil {
			return nil, err
		}
	}
	res.CombinationType = opts.CombinationType
	res.Warnings = append(res.Warnings, opts.PrepareRandomness()...)
	res.Seed = opts.Seed

	adapters, err := adapter.LoadAll(opts.Adapters, false)
	if err != nil {
		return nil, err
	}
	defer func() {
		for _, a := range adapters {
			a.Close()
		}
	}()
	for _, a := range adapters {
		a.File.AllowNonFinite = opts.AllowNonFinite
	}
	res.Warnings = append(res.Warnings, baseModelWarnings(opts.Adapters, adapters)...)
	for i, a := range adapters {
		res.Warnings = append(res.Warnings, opts.Weights[i].UnusedPatterns(i, opts.Adapters[i], a.Order)...)
	}
	for i, dir := range opts.Adapters {
		a := adapters[i]
		if len(a.Extra) > 0 {
			res.Warnings = append(res.Warnings, fmt.Sprintf(
				"%s: %d tensor(s) that are not LoRA factors were left out of the merge (first: %s)", dir, len(a.Extra), a.Extra[0]))
		}
	}
	if err := ctx.Err(); err != nil {
		return nil, errs.ErrCancelled
	}
	outDType := adapters[0].DType
	if opts.DType != "" {
		outDType, _ = safetensors.ParseDType(opts.DType)
	}
	res.DType = outDType.TorchName()

	rank, err := opts.NewRank(opts.Adapters, adapters)
	if err != nil {
		return nil, err
	}
	res.Rank = rank
	cfgs := make([]*adapter.Config, len(adapters))
	for i, a := range adapters {
		cfgs[i] = a.Config
	}
	targets, err := adapter.UnionTargetModules(cfgs, opts.Adapters)
	if err != nil {
		return nil, err
	}
	params, err := adapter.UnionTargetParameters(cfgs, opts.Adapters)
	if err != nil {
		return nil, err
	}
	jobs, err := opts.PlanModules(opts.Adapters, opts.Weights, adapters)
	if err != nil {
		return nil, err
	}
	res.Modules = len(jobs)
	if opts.Workers, err = planWorkers(opts, jobs, availableMemory()); err != nil {
		return nil, err
	}

	if err := ctx.Err(); err != nil {
		return nil, errs.ErrCancelled
	}
	pending, err := adapter.CreateOutput(opts.OutputDir, opts.Overwrite)
	if err != nil {
		return nil, err
	}
	committed := false
	defer func() {
		if !committed {
			pending.Abort()
		}
	}()
	weightsPath, err := pending.Path(adapter.WeightsFile)
	if err != nil {
		return nil, err
	}
	outcomes, err := writeModules(ctx, opts, jobs, rank, outDType, progress, weightsPath)
	if err != nil {
		return nil, err
	}
	ranks := make([]int, len(jobs))
	res.ModuleRanks, res.ModuleErrors, res.ModuleExperts = map[string]int{}, map[string]float64{}, map[string]ModuleExperts{}
	for i, o := range outcomes {
		if jobs[i].Experts > 1 {
			res.ModuleExperts[jobs[i].Name] = ModuleExperts{Param: jobs[i].Param, Experts: jobs[i].Experts}
		}
		ranks[i] = o.Rank
		res.ModuleRanks[jobs[i].Name] = o.Rank
		if !math.IsNaN(o.RelErr) {
			res.ModuleErrors[jobs[i].Name] = o.RelErr
		}
	}
	if opts.EnergyRanks() { // the adapter's r is the largest module rank; the others go into rank_pattern
		res.Rank = slices.Max(ranks)
	}
	if err := writeConfigAndCard(pending, opts, res, adapters[0].Config, targets, params, rankPattern(jobs, ranks, res.Rank)); err != nil {
		return nil, err
	}
	if err := ctx.Err(); err != nil {
		return nil, errs.ErrCancelled
	}
	if err := pending.Commit(); err != nil {
		return nil, err
	}
	committed = true
	res.Seconds = time.Since(start).Seconds()
	return res, nil
}

// writeModules merges the modules into the safetensors file at path. When
// every output shape is known before merging, the header is written first
// and then each module as it is done, so that results never pile up in
// memory; with ranks chosen from each module's spectrum (the energy rule)
// the results, the size of the output, are held until the last one.
func writeModules(ctx context.Context, opts Options, jobs []methods.ModuleJob, rank int, dt safetensors.DType, progress *parallel.Progress, path string) ([]methods.Outcome, error) {
	meta := map[string]string{"format": "pt"}
	if !opts.EnergyRanks() {
		w, err := safetensors.Create(path, outputTensors(&opts.Combine, jobs, rank, dt), meta)
		if err != nil {
			return nil, err
		}
		outcomes, err := runJobs(ctx, &opts.Combine, opts.Workers, jobs, rank, dt, progress, nil, func(_ int, aName, bName string, a, b safetensors.RawTensor) error {
			return w.WritePair(aName, a.Data, bName, b.Data)
		})
		if cerr := w.Close(); err == nil {
			err = cerr
		}
		return outcomes, err
	}
	type pair struct {
		aName, bName string
		a, b         safetensors.RawTensor
	}
	held := make([]pair, len(jobs))
	outcomes, err := runJobs(ctx, &opts.Combine, opts.Workers, jobs, rank, dt, progress, nil, func(i int, aName, bName string, a, b safetensors.RawTensor) error {
		// runJobs hands its buffers back to the pool after emit: keep copies
		ca, cb := a, b
		ca.Data, cb.Data = append([]byte(nil), a.Data...), append([]byte(nil), b.Data...)
		held[i] = pair{aName, bName, ca, cb}
		return nil
	})
	if err != nil {
		return nil, err
	}
	outs := make([]safetensors.OutTensor, 0, 2*len(held))
	for _, p := range held {
		outs = append(outs, safetensors.OutTensor{Name: p.aName, DType: dt, Shape: p.a.Shape},
			safetensors.OutTensor{Name: p.bName, DType: dt, Shape: p.b.Shape})
	}
	w, err := safetensors.Create(path, outs, meta)
	if err != nil {
		return nil, err
	}
	for _, p := range held {
		if err = w.WritePair(p.aName, p.a.Data, p.bName, p.b.Data); err != nil {
			break
		}
	}
	if cerr := w.Close(); err == nil {
		err = cerr
	}
	return outcomes, err
}

// emitFunc receives the merged tensors of job i; it may be called from
// several goroutines at once.
type emitFunc func(i int, aName, bName string, a, b safetensors.RawTensor) error

// runJobs merges the modules on all cores, hands each result to emit and
// returns each module's merged rank.
func runJobs(ctx context.Context, c *methods.Combine, workers int, jobs []methods.ModuleJob, rank int, dt safetensors.DType, progress *parallel.Progress, ready func(i int) error, emit emitFunc) ([]methods.Outcome, error) {
	if progress != nil {
		progress.Total.Store(int64(len(jobs)))
	}
	outcomes := make([]methods.Outcome, len(jobs))
	err := parallel.RunJobs(ctx, len(jobs), workers, progress, func(_, i int) error {
		if ready != nil {
			if err := ready(i); err != nil {
				return err
			}
		}
		aName, bName, a, b, o, err := methods.RunModule(ctx, c, &jobs[i], rank, dt)
		if err == nil {
			err = emit(i, aName, bName, a.RawTensor, b.RawTensor)
			pool.Put(a.Buf) // emit has written or copied them
			pool.Put(b.Buf)
		}
		outcomes[i] = o
		return err
	})
	if err != nil {
		return nil, err
	}
	return outcomes, nil
}

// baseModelWarnings warns, once per other base, about adapters whose
// configs name another base model (base_model_name_or_path) than the first
// adapter's: their merge is rarely meaningful. Adapters that name none are
// not compared.
func baseModelWarnings(dirs []string, adapters []*adapter.Adapter) []string {
	var warnings []string
	first := adapters[0].Config.BaseModel
	seen := map[string]bool{first: true, "": true}
	for i, a := range adapters[1:] {
		base := a.Config.BaseModel
		if first == "" || seen[base] {
			continue
		}
		seen[base] = true
		warnings = append(warnings, fmt.Sprintf("adapters %s and %s name different base models (%s and %s, "+
			"base_model_name_or_path): merging adapters trained on different bases is rarely meaningful; check the sources",
			dirs[0], dirs[i+1], first, base))
	}
	return warnings
}
