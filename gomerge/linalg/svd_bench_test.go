package linalg

import (
	"fmt"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"
)

// BenchmarkLowRankSVD512 is S3's svd module: eight rank-64 factors of a
// Llama-7B attention projection (4096 x 4096) stacked to rank 512 and
// truncated to rank 64.
func BenchmarkLowRankSVD512(b *testing.B) {
	for _, sh := range []struct {
		name    string
		out, in int
	}{{"4096x4096", 4096, 4096}, {"11008x4096", 11008, 4096}} {
		b.Run(sh.name, func(b *testing.B) {
			rng := rand.New(rand.NewPCG(1, 2))
			const r = 512
			bc0 := make([]float64, sh.out*r)
			ac0 := make([]float64, r*sh.in)
			for i := range bc0 {
				bc0[i] = rng.NormFloat64() * 0.02
			}
			for i := range ac0 {
				ac0[i] = rng.NormFloat64() * 0.02
			}
			bc := make([]float64, len(bc0))
			ac := make([]float64, len(ac0))
			for b.Loop() {
				copy(bc, bc0)
				copy(ac, ac0)
				LowRankSVD(bc, ac, sh.out, r, sh.in, 64)
			}
		})
	}
}

// BenchmarkRandomizedSVD4096 is S2's ties_svd SVD: a dense 4096 x 4096
// update truncated to rank 16.
func BenchmarkRandomizedSVD4096(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 2))
	const m, n = 4096, 4096
	d := make([]float32, m*n)
	for i := range d {
		d[i] = float32(rng.NormFloat64())
	}
	for b.Loop() {
		RandomizedSVD(d, m, n, 16, rand.New(rand.NewPCG(3, 4)))
	}
}

// BenchmarkLowRankSVDS1 is S1's svd module arithmetic: three rank-8
// adapters of TinyLlama stacked to rank 24 and truncated to rank 8, by the
// Householder QRs and by the Gram route.
func BenchmarkLowRankSVDS1(b *testing.B) {
	for _, sh := range []struct{ out, in int }{{2048, 2048}, {5632, 2048}, {256, 2048}} {
		rng := rand.New(rand.NewPCG(1, 2))
		const r, k = 24, 8
		bc0 := make([]float64, sh.out*r)
		ac0 := make([]float64, r*sh.in)
		for i := range bc0 {
			bc0[i] = rng.NormFloat64() * 0.02
		}
		for i := range ac0 {
			ac0[i] = rng.NormFloat64() * 0.02
		}
		bc := make([]float64, len(bc0))
		ac := make([]float64, len(ac0))
		rank := func([]float64) int { return k }
		b.Run(fmt.Sprintf("householder/%dx%d", sh.out, sh.in), func(b *testing.B) {
			defer reportCPU(b)()
			for b.Loop() {
				copy(bc, bc0)
				copy(ac, ac0)
				lowRankSVDQR(bc, ac, sh.out, r, sh.in, rank)
			}
		})
		b.Run(fmt.Sprintf("gram/%dx%d", sh.out, sh.in), func(b *testing.B) {
			defer reportCPU(b)()
			for b.Loop() {
				if _, _, _, _, ok := lowRankSVDGram(bc0, ac0, sh.out, r, sh.in, rank); !ok {
					b.Fatal("the Gram route fell back")
				}
			}
		})
	}
}

// reportCPU reports the process's CPU time per iteration (cpu-ms/op),
// steadier than the wall time on a shared machine: call as
// defer reportCPU(b)().
func reportCPU(b *testing.B) func() {
	cpu := func() time.Duration {
		var ru syscall.Rusage
		if err := syscall.Getrusage(syscall.RUSAGE_SELF, &ru); err != nil {
			return 0
		}
		return time.Duration(ru.Utime.Nano() + ru.Stime.Nano())
	}
	start := cpu()
	return func() { b.ReportMetric(float64(cpu()-start)/1e6/float64(b.N), "cpu-ms/op") }
}
