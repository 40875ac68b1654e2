package methods

import (
	"context"
	"fmt"
	"gomerge/gomerge/linalg"
	"math/rand/v2"
	"syscall"
	"testing"
	"time"

	"github.com/stretchr/testify/require"
)

// BenchmarkDellaModule is bench M1's gomerge side without the disk: three
// rank-16 adapters on S2's shapes, merged by della and della_linear
// (mergeDenseSVD: the dense updates, the pruning and combination, the
// randomized SVD to rank 16), and its stages on their own.
func BenchmarkDellaModule(b *testing.B) {
	for _, shape := range [][2]int{{4096, 4096}, {4096, 11008}} {
		out, in := shape[0], shape[1]
		srcs := spanSources(rand.New(rand.NewPCG(21, 22)), out, in, 16, 16, 16)
		j := &ModuleJob{Name: "proj", Srcs: srcs, In: in, Out: out}
		density := 0.4
		seed := uint64(1)
		for _, name := range []string{"della", "della_linear"} {
			b.Run(fmt.Sprintf("%s/%dx%d", name, out, in), func(b *testing.B) {
				o := Combine{CombinationType: name, Density: &density, Seed: &seed}
				require.NoError(b, o.Validate())
				g := o.generalized(mergekitOf(name))
				defer reportCPU(b)()
				for b.Loop() {
					if _, _, _, err := mergeDenseSVD(context.Background(), j, Combination{}, g, 16, nil, seed); err != nil {
						b.Fatal(err)
					}
				}
			})
		}
		fa, fb, err := srcs[0].Mod.Factors()
		require.NoError(b, err)
		dw := linalg.DenseDelta(fa, fb, out, 16, in, srcs[0].Mod.Scaling)
		b.Run(fmt.Sprintf("denseDelta/%dx%d", out, in), func(b *testing.B) {
			defer reportCPU(b)()
			for b.Loop() {
				linalg.DenseDelta(fa, fb, out, 16, in, srcs[0].Mod.Scaling)
			}
		})
		t := make([]float32, len(dw))
		b.Run(fmt.Sprintf("DellaPrune/%dx%d", out, in), func(b *testing.B) {
			defer reportCPU(b)()
			for b.Loop() {
				copy(t, dw)
				DellaPrune(t, out, in, 1, density, DefaultEpsilon, true, dellaSource(seed, "proj", 0))
			}
		})
		b.Run(fmt.Sprintf("RandomizedSVD/%dx%d", out, in), func(b *testing.B) {
			defer reportCPU(b)()
			for b.Loop() {
				linalg.RandomizedSVD(t, out, in, 16, TensorRNG(rsvdSeed, "proj", "rsvd"))
			}
		})
	}
}

// reportCPU reports the process's CPU time per iteration (cpu-ms/op), steadier than the wall time on a shared
// machine: call as defer reportCPU(b)().
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
