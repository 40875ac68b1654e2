package gomerge

import (
	"bufio"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/methods"
	"os"
	"runtime"
	"strconv"
	"strings"
)

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
func planWorkers(opts Options, jobs []methods.ModuleJob, avail int64) (int, error) {
	workers := opts.Workers
	if workers <= 0 {
		workers = runtime.GOMAXPROCS(0)
	}
	var largest int64
	var name string
	for i := range jobs {
		if m := opts.Method().Memory(&jobs[i], &opts.Combine); m > largest {
			largest, name = m, jobs[i].Name
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
