package kernels

import (
	"math"
	"runtime"
	"sync"
	"time"
)

// The machine's peak fused multiply-add rate per kernel set: independent
// chains of multiply-adds (enough to hide their latency on every pipe) in
// registers, with no memory traffic. The benchmarks report the product
// kernel's rate (Gemm32) against it.

// peakLoop runs iters steps of the set's chains and returns the flops done
// (2 per lane and multiply-add) and a value that keeps the work alive.
type peakLoop func(iters int) (flops float64, sink float64)

// peakLoops are the sets' loops by name: float32 then float64 (peak_simd.go
// adds the vector ones). Go has no float32 multiply-add: the portable set's
// rate is math.FMA's, for both.
var peakLoops = map[string][2]peakLoop{
	"go": {peakGo, peakGo},
}

// Rate is a measured rate of floating-point operations: Wall is per
// second of the wall clock (all threads together), CPU per second of CPU
// time of each thread, summed over the threads (what the threads would do
// with a core each: this does not depend on other processes sharing the
// cores; 0 where the CPU time is not read).
type Rate struct {
	Wall, CPU float64
}

// PeakFMA measures the fused multiply-add rate of the kernel set named set,
// in flops per second (2 per lane and multiply-add), float32 or float64
// (f64), on threads goroutines at once (each on an OS thread of its own),
// each running for about d.
func PeakFMA(set string, f64 bool, threads int, d time.Duration) (Rate, error) {
	k, err := runnableSet(set)
	if err != nil {
		return Rate{}, err
	}
	loop := peakLoops[k.name][0]
	if f64 {
		loop = peakLoops[k.name][1]
	}
	threads = max(1, threads)
	const chunk = 1 << 16
	flops := make([]float64, threads)
	cpu := make([]float64, threads)
	var wg sync.WaitGroup
	var ready sync.WaitGroup
	ready.Add(threads)
	gate := make(chan struct{})
	var start time.Time
	for t := range threads {
		wg.Add(1)
		go func() {
			defer wg.Done()
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			loop(chunk) // warm up (and let the clock settle)
			ready.Done()
			<-gate
			c0 := cpuSeconds(true)
			sink := 0.0
			for flops[t] == 0 || time.Since(start) < d {
				f, s := loop(chunk)
				flops[t] += f
				sink += s
			}
			cpu[t] = cpuSeconds(true) - c0
			if math.IsNaN(sink) {
				flops[t] = 0 // never: keeps sink used
			}
		}()
	}
	ready.Wait()
	start = time.Now()
	close(gate)
	wg.Wait()
	wall := time.Since(start).Seconds()
	var r Rate
	for t, f := range flops {
		r.Wall += f / wall
		if cpu[t] > 0 {
			r.CPU += f / cpu[t]
		}
	}
	return r, nil
}

func peakGo(iters int) (float64, float64) {
	const a, b = 1e-3, 1e-3
	// chains that start apart: the compiler would merge equal ones into one
	c0, c1, c2, c3, c4, c5, c6, c7 := 0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0
	for range iters {
		c0, c1, c2, c3 = math.FMA(c0, a, b), math.FMA(c1, a, b), math.FMA(c2, a, b), math.FMA(c3, a, b)
		c4, c5, c6, c7 = math.FMA(c4, a, b), math.FMA(c5, a, b), math.FMA(c6, a, b), math.FMA(c7, a, b)
	}
	return 2 * 8 * float64(iters), c0 + c1 + c2 + c3 + c4 + c5 + c6 + c7
}
