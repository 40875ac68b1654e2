package bindings

import (
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"runtime"
	"time"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/kernels"
)

// rateJSON is a measured rate in GFLOP/s: per second of the wall clock,
// and per second of each thread's CPU time summed over the threads (what
// the threads would reach with a core each, whatever else shares the
// cores; 0 where the CPU time is not read).
type rateJSON struct {
	Wall float64 `json:"wall"`
	CPU  float64 `json:"cpu"`
}

// setRates are one kernel set's rates: the peak fused multiply-add rate,
// float32 and float64, on one thread and on every core, and Gemm32's rate
// on the product asked for.
type setRates struct {
	FMA32One  rateJSON  `json:"fma32_one_core"`
	FMA32All  rateJSON  `json:"fma32_all_cores"`
	FMA64One  rateJSON  `json:"fma64_one_core"`
	FMA64All  rateJSON  `json:"fma64_all_cores"`
	Gemm32One *rateJSON `json:"gemm32_one_core,omitempty"`
	Gemm32All *rateJSON `json:"gemm32_all_cores,omitempty"`
}

// KernelRates measures the machine's arithmetic rates, for the benchmarks'
// yardstick. The request is JSON: {"seconds": each peak measurement's
// duration (default 0.25), "gemm": [m, n, k] (optional: a float32 product
// A (m x k) B (k x n) to time, as the randomized SVD's sketch does it),
// "sets": [names] (default: every set this CPU runs)}. The result is JSON:
// {"cores", "in_use", "sets": {name: rates in GFLOP/s}}, or {"error"}.
func KernelRates(request string) (out string) {
	defer func() {
		if r := recover(); r != nil {
			out = errorStatus(fmt.Errorf("kernel rates: %v", r))
		}
	}()
	var req struct {
		Seconds float64  `json:"seconds"`
		Gemm    []int    `json:"gemm"`
		Sets    []string `json:"sets"`
	}
	if err := json.Unmarshal([]byte(request), &req); err != nil {
		return errorStatus(errs.Value("kernel rates: bad request: %v", err))
	}
	if req.Seconds <= 0 {
		req.Seconds = 0.25
	}
	if req.Gemm != nil && (len(req.Gemm) != 3 || min(req.Gemm[0], req.Gemm[1], req.Gemm[2]) <= 0) {
		return errorStatus(errs.Value("kernel rates: gemm must be [m, n, k], all positive; got %v", req.Gemm))
	}
	if len(req.Sets) == 0 {
		req.Sets = kernels.Runnable()
	}
	d := time.Duration(req.Seconds * float64(time.Second))
	cores := runtime.GOMAXPROCS(0)
	res := struct {
		Cores int                 `json:"cores"`
		InUse string              `json:"in_use"`
		Sets  map[string]setRates `json:"sets"`
	}{Cores: cores, InUse: kernels.InUse(), Sets: map[string]setRates{}}
	g := func(r kernels.Rate) rateJSON { return rateJSON{Wall: r.Wall / 1e9, CPU: r.CPU / 1e9} }
	for _, set := range req.Sets {
		var sr setRates
		for _, m := range []struct {
			f64     bool
			threads int
			into    *rateJSON
		}{{false, 1, &sr.FMA32One}, {false, cores, &sr.FMA32All}, {true, 1, &sr.FMA64One}, {true, cores, &sr.FMA64All}} {
			r, err := kernels.PeakFMA(set, m.f64, m.threads, d)
			if err != nil {
				return errorStatus(errs.Value("kernel rates: %v", err))
			}
			*m.into = g(r)
		}
		if req.Gemm != nil {
			for _, threads := range []int{1, cores} {
				r, err := kernels.GemmRate(set, threads, req.Gemm[0], req.Gemm[1], req.Gemm[2], d, rand.New(rand.NewPCG(1, 2)))
				if err != nil {
					return errorStatus(errs.Value("kernel rates: %v", err))
				}
				rj := g(r)
				if threads == 1 {
					sr.Gemm32One = &rj
				} else {
					sr.Gemm32All = &rj
				}
			}
		}
		res.Sets[set] = sr
	}
	b, _ := json.Marshal(res)
	return string(b)
}
