package gomerge

import (
	"bufio"
	"gomerge/gomerge/errs"
	"os"
	"runtime"
	"strconv"
	"strings"
)

// factorBytes is the float32 size of the module's source factors.
func factorBytes(j *moduleJob) int64 {
	factors := int64(0)
	for _, s := range j.srcs {
		factors += int64(s.mod.Rank) * int64(j.in+j.out) * 4
	}
	return factors
}

// factorMemory is the peak memory of the merges that work on the factors
// (the factor-wise methods, cat): a few copies of them.
func factorMemory(j *moduleJob, _ *Combine) int64 { return 4 * factorBytes(j) }

// exactMemory is the peak memory of the exact factorisations (svd, the
// span methods): the stacked factors and thin Qs, in float64.
func exactMemory(j *moduleJob, _ *Combine) int64 {
	total := int64(0)
	for _, s := range j.srcs {
		total += int64(s.mod.Rank)
	}
	return 3*total*int64(j.in+j.out)*8 + 3*factorBytes(j)
}

// denseMemory is the peak memory of the merges of the dense updates: one
// dense update per source (the result overwrites the first), the sketch,
// the factors.
func denseMemory(j *moduleJob, _ *Combine) int64 {
	return int64(len(j.srcs))*int64(j.in)*int64(j.out)*4 + 3*factorBytes(j)
}

// taskArithmeticMemory is cat's memory, or the exact SVD's when svd_rank
// truncates it.
func taskArithmeticMemory(j *moduleJob, c *Combine) int64 {
	if c.SVDRank != nil {
		return exactMemory(j, c)
	}
	return factorMemory(j, c)
}

// availableMemory reads MemAvailable from /proc/meminfo (0 when unknown).
func availableMemory() int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return 0
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if rest, ok := strings.CutPrefix(sc.Text(), "MemAvailable:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSpace(strings.TrimSuffix(strings.TrimSpace(rest), "kB")), 10, 64)
			if err == nil {
				return kb << 10
			}
		}
	}
	return 0
}

// planWorkers picks how many modules to merge at once so that their peak
// memory fits what the machine has available, and refuses a merge whose
// largest module alone would not fit, before anything is allocated.
func planWorkers(opts Options, jobs []moduleJob, avail int64) (int, error) {
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	var largest int64
	var name string
	for i := range jobs {
		if m := opts.method.Memory(&jobs[i], &opts.Combine); m > largest {
			largest, name = m, jobs[i].name
		}
	}
	if avail <= 0 || largest == 0 {
		return workers, nil
	}
	budget := avail * 3 / 4
	if largest > budget {
		return 0, errs.Value("module %s: combination_type %s needs about %.1f GiB of memory, but only %.1f GiB is available",
			name, opts.CombinationType, float64(largest)/(1<<30), float64(avail)/(1<<30))
	}
	if opts.Workers <= 0 {
		workers = max(1, min(workers, int(budget/largest)))
	}
	return workers, nil
}
