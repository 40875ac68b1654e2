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
	if len(opts.Adapters) == 1 && opts.method.PEFT && opts.CombinationType != "linear" {
		res.Warnings = append(res.Warnings, fmt.Sprintf(
			"one adapter only: combination_type %q is replaced by \"linear\", as PEFT does", opts.CombinationType))
		opts.CombinationType = "linear"
		opts.method, _ = LookupMethod("linear")
	}
	res.CombinationType = opts.CombinationType
	res.Warnings = append(res.Warnings, opts.prepareRandomness()...)
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

	rank, err := newRank(opts, adapters)
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
	jobs, err := planModules(opts, adapters)
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
	res.ModuleRanks, res.ModuleErrors = map[string]int{}, map[string]float64{}
	for i, o := range outcomes {
		ranks[i] = o.rank
		res.ModuleRanks[jobs[i].name] = o.rank
		if !math.IsNaN(o.relErr) {
			res.ModuleErrors[jobs[i].name] = o.relErr
		}
	}
	if opts.energyRanks() { // the adapter's r is the largest module rank; the others go into rank_pattern
		res.Rank = slices.Max(ranks)
	}
	if err := writeConfigAndCard(pending, opts, res, adapters[0].Config, targets, rankPattern(jobs, ranks, res.Rank)); err != nil {
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
func writeModules(ctx context.Context, opts Options, jobs []moduleJob, rank int, dt safetensors.DType, progress *parallel.Progress, path string) ([]moduleOutcome, error) {
	meta := map[string]string{"format": "pt"}
	if !opts.energyRanks() {
		w, err := safetensors.Create(path, outputTensors(&opts.Combine, jobs, rank, dt), meta)
		if err != nil {
			return nil, err
		}
		outcomes, err := runJobs(ctx, &opts.Combine, opts.Workers, jobs, rank, dt, progress, func(_ int, aName, bName string, a, b safetensors.RawTensor) error {
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
	outcomes, err := runJobs(ctx, &opts.Combine, opts.Workers, jobs, rank, dt, progress, func(i int, aName, bName string, a, b safetensors.RawTensor) error {
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

// resultTensor is a merged tensor, encoded (Data) from its float32 memory
// (buf), which runJobs gives back to the pool once emit has written it.
type resultTensor struct {
	safetensors.RawTensor
	buf []float32
}

// emitFunc receives the merged tensors of job i; it may be called from
// several goroutines at once.
type emitFunc func(i int, aName, bName string, a, b safetensors.RawTensor) error

// runJobs merges the modules on all cores, hands each result to emit and
// returns each module's merged rank.
func runJobs(ctx context.Context, c *Combine, workers int, jobs []moduleJob, rank int, dt safetensors.DType, progress *parallel.Progress, emit emitFunc) ([]moduleOutcome, error) {
	if progress != nil {
		progress.Total.Store(int64(len(jobs)))
	}
	outcomes := make([]moduleOutcome, len(jobs))
	err := parallel.RunJobs(ctx, len(jobs), workers, progress, func(_, i int) error {
		aName, bName, a, b, o, err := runModule(ctx, c, &jobs[i], rank, dt)
		if err == nil {
			err = emit(i, aName, bName, a.RawTensor, b.RawTensor)
			pool.Put(a.buf) // emit has written or copied them
			pool.Put(b.buf)
		}
		outcomes[i] = o
		return err
	})
	if err != nil {
		return nil, err
	}
	return outcomes, nil
}

// runModule merges one module by its method's row, recovering from panics
// so that a bug in a kernel becomes an error naming the module, and
// encodes the result to dt.
func runModule(ctx context.Context, c *Combine, j *moduleJob, rank int, dt safetensors.DType) (aName, bName string, ra, rb resultTensor, out moduleOutcome, err error) {
	defer func() {
		for _, s := range j.srcs {
			s.mod.Release()
		}
	}()
	defer func() {
		if p := recover(); p != nil { // a bug: read errors are returned, never raised
			err = errs.New(errs.KindInternal, "module %s: internal error: %v", j.name, p)
		}
	}()
	o, err := c.method.Merge(ctx, j, c, rank)
	if err != nil {
		return "", "", resultTensor{}, resultTensor{}, out, err
	}
	aName, bName = adapter.ModuleKeys(j.name, j.kind)
	aShape := append([]int{o.rank}, j.aTail...)
	bShape := append([]int{j.out, o.rank}, j.bTail...)
	// a and b are this merge's own memory: float32 results are written as they are, without a copy
	encode := func(x []float32) []byte {
		if dt == safetensors.F32 {
			return safetensors.Float32AsBytes(x)
		}
		return safetensors.Encode(dt, x)
	}
	return aName, bName, resultTensor{safetensors.RawTensor{DType: dt, Shape: aShape, Data: encode(o.a)}, o.a},
		resultTensor{safetensors.RawTensor{DType: dt, Shape: bShape, Data: encode(o.b)}, o.b}, moduleOutcome{rank: o.rank, relErr: o.relErr}, nil
}

// moduleOutcome is what a module's merge chose: its rank, and the relative
// Frobenius error of its factorisation (NaN where there is none).
type moduleOutcome struct {
	rank   int
	relErr float64
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
