package extract

// Running the jobs on all cores, each reading its tensors from both folders.

import (
	"context"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
)

// runExtractJobs runs the jobs on the workers; each job reads its tensors
// from both folders, so that memory holds only the modules in progress (and
// the factors made so far).
func runExtractJobs(ctx context.Context, opts Options, jobs []extractJob, base, ft *modelfolder.Folder, rule linalg.RankRule, dt safetensors.DType, seed uint64, progress *parallel.Progress) ([]extractOutcome, error) {
	if progress != nil {
		progress.Total.Store(int64(len(jobs)))
	}
	outcomes := make([]extractOutcome, len(jobs))
	err := parallel.RunJobs(ctx, len(jobs), opts.Workers, progress, func(_, i int) (err error) {
		outcomes[i], err = runExtractJob(&jobs[i], base, ft, rule, dt, seed)
		return err
	})
	if err != nil {
		return nil, err
	}
	return outcomes, nil
}

// runExtractJob runs one job, turning a panic into an error naming it.
func runExtractJob(j *extractJob, base, ft *modelfolder.Folder, rule linalg.RankRule, dt safetensors.DType, seed uint64) (out extractOutcome, err error) {
	defer func() {
		if p := recover(); p != nil {
			err = errs.New(errs.KindInternal, "module %s: internal error: %v", j.module, p)
		}
	}()
	if j.expert != nil {
		return extractExperts(j, base, ft, rule, dt, seed)
	}
	if j.lora {
		return extractLinear(j, base, ft, rule, dt, seed)
	}
	return compareModule(j, base, ft)
}

// readPair reads a tensor from both folders into pooled buffers.
func readPair(name string, base, ft *modelfolder.Folder) (wb, wf []float32, err error) {
	be, _ := base.Info(name)
	n := safetensors.Numel(be.Shape)
	wb, err = base.ReadFloat32Into(pool.Get(n), name)
	if err != nil {
		return nil, nil, err
	}
	wf, err = ft.ReadFloat32Into(pool.Get(n), name)
	if err != nil {
		pool.Put(wb)
		return nil, nil, err
	}
	return wb, wf, nil
}
