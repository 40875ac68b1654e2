package parallel

import (
	"context"
	"gomerge/gomerge/errs"
	"math"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"sync"
	"sync/atomic"
)

// Progress counts a job's finished steps (merged modules, written tensors);
// it is safe to read while the job runs.
type Progress struct {
	Done  atomic.Int64
	Total atomic.Int64
}

// For calls fn on consecutive ranges [lo, hi) covering [0, n), on up
// to GOMAXPROCS goroutines, in chunks of at least grain elements. Small
// ranges run on the calling goroutine.
func For(n, grain int, fn func(lo, hi int)) {
	workers := runtime.GOMAXPROCS(0)
	if n <= grain || workers == 1 {
		if n > 0 {
			fn(0, n)
		}
		return
	}
	chunks := min(workers*4, (n+grain-1)/grain)
	size := (n + chunks - 1) / chunks
	var wg sync.WaitGroup
	for lo := 0; lo < n; lo += size {
		hi := min(lo+size, n)
		wg.Add(1)
		go func() {
			defer wg.Done()
			fn(lo, hi)
		}()
	}
	wg.Wait()
}

// RunJobs calls fn(worker, i) once for each job i in [0, n), on up to
// workers goroutines (GOMAXPROCS when workers <= 0; worker in [0, that) is
// the goroutine's own index, for its scratch buffers). The first error stops
// the others from taking new jobs and is returned; a cancelled ctx stops
// them too and gives ErrCancelled. After each job it counts progress.Done
// and retunes the collector (gcTune).
func RunJobs(ctx context.Context, n, workers int, progress *Progress, fn func(worker, i int) error) error {
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	var next atomic.Int64
	var errOnce sync.Once
	var firstErr error
	var failed atomic.Bool
	var wg sync.WaitGroup
	for w := range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				i := int(next.Add(1) - 1)
				if i >= n || ctx.Err() != nil || failed.Load() {
					return
				}
				if err := fn(w, i); err != nil {
					errOnce.Do(func() { firstErr = err })
					failed.Store(true)
					return
				}
				if progress != nil {
					progress.Done.Add(1)
				}
				gcTune()
			}
		}()
	}
	wg.Wait()
	if ctx.Err() != nil {
		return errs.ErrCancelled
	}
	return firstErr
}

// gcHeadroom is how much garbage a merge may leave between collections.
// Streaming merges keep little live data but allocate steadily; with a small
// live heap Go's collector would run every few megabytes, stop the world
// hundreds of times per merge and cost more than the merge itself.
const gcHeadroom = 128 << 20

// gcMemoryLimit is the soft memory limit a merge holds while no other is
// set (GOMEMLIMIT, the caller, a fuse): the live heap (as of the last
// module), the headroom and 128 MiB for the modules in flight and the
// runtime's own. Without it, freed memory goes back to the OS only at the
// background scavenger's slow pace: S3's svd (modules of 11008 x 4096 with
// stacked rank 512, two at a time) reached 790 MiB of RSS for a heap goal of
// about 300 MB; with it, 530 MiB, for 8% more time.
func gcMemoryLimit(live uint64) int64 { return int64(live + gcHeadroom + 128<<20) }

var (
	gcMu      sync.Mutex
	gcUsers   int
	gcPercent int  // the setting to restore
	gcSet     int  // the setting in force
	gcLimit   bool // a merge set the soft memory limit (none was set before)
)

func liveHeap() uint64 {
	sample := []metrics.Sample{{Name: "/gc/heap/live:bytes"}}
	metrics.Read(sample)
	live := uint64(1 << 20)
	if sample[0].Value.Kind() == metrics.KindUint64 {
		live = max(live, sample[0].Value.Uint64())
	}
	return live
}

// gcTune keeps the headroom at about gcHeadroom as the live heap changes
// (called between modules); it only touches the setting when it moves by
// more than a quarter.
func gcTune() {
	gcMu.Lock()
	defer gcMu.Unlock()
	if gcUsers == 0 {
		return
	}
	live := liveHeap()
	want := max(100, int(gcHeadroom*100/live))
	if want*4 < gcSet*3 || want*4 > gcSet*5 {
		debug.SetGCPercent(want)
		gcSet = want
	}
	if gcLimit {
		debug.SetMemoryLimit(gcMemoryLimit(live))
	}
}

// HoldGCHeadroom raises GOGC for the duration of a merge so that the next
// collection comes after about gcHeadroom bytes (never below Go's default
// of 100%), and holds a soft memory limit (gcMemoryLimit) where none is set;
// the returned function restores both when the last concurrent merge ends.
func HoldGCHeadroom() func() {
	gcMu.Lock()
	if gcUsers == 0 {
		live := liveHeap()
		gcSet = max(100, int(gcHeadroom*100/live))
		gcPercent = debug.SetGCPercent(gcSet)
		if gcLimit = debug.SetMemoryLimit(-1) == math.MaxInt64; gcLimit {
			debug.SetMemoryLimit(gcMemoryLimit(live))
		}
	}
	gcUsers++
	gcMu.Unlock()
	return func() {
		gcMu.Lock()
		gcUsers--
		if gcUsers == 0 {
			debug.SetGCPercent(gcPercent)
			if gcLimit {
				debug.SetMemoryLimit(math.MaxInt64)
				gcLimit = false
			}
		}
		gcMu.Unlock()
	}
}
