package kernels

import (
	"math/rand/v2"
	"testing"
)

// gtaReference is GTAInto as mergekit's generalized task arithmetic reads
// (and as package gomerge computed it before the kernel): the scaled,
// weighted values, a branch per agreeing value.
func gtaReference(n int, ts [][]float32, scale, w []float32, consensus, normalize bool, divisor, lambda float32) []float32 {
	out := make([]float32, n)
	for e := range out {
		var mixed, div float32
		if consensus {
			var sum float32
			for i, t := range ts {
				sum += (t[e] * scale[i]) * w[i]
			}
			elected := float32(1)
			if !(sum >= 0) {
				elected = -1
			}
			for i, t := range ts {
				d := (t[e] * scale[i]) * w[i]
				if Agrees(d, elected) != 0 {
					mixed += d
					div += w[i]
				}
			}
			if div == 0 {
				div = 1
			}
		} else {
			for i, t := range ts {
				mixed += (t[e] * scale[i]) * w[i]
			}
			div = divisor
		}
		if normalize {
			mixed /= div
		}
		if lambda != 1 {
			mixed *= lambda
		}
		out[e] = mixed
	}
	return out
}

// GTAInto: the portable version against the reference, every set this CPU
// runs against the portable version (tensors in and beyond one group of
// four, blocks and tails, zeros, ties of magnitude, non-finite values).
func TestGTAKernels(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(8, 9))
	for _, tensors := range []int{1, 3, 4, 5, 9} {
		for _, n := range []int{0, 7, 13, kernelBlock + 9, 3001} {
			for _, finite := range []bool{true, false} {
				ts := kernelInputs(rng, tensors, n, finite)
				scale, w := make([]float32, tensors), make([]float32, tensors)
				for i := range w {
					scale[i], w[i] = float32(0.5+rng.Float64()), float32(rng.NormFloat64())
				}
				if tensors > 1 {
					w[1] = -w[0] // weights that cancel: divisors of 0
				}
				for _, mode := range []struct {
					consensus, normalize bool
					divisor, lambda      float32
				}{{true, true, 0, 1}, {true, false, 0, 0.7}, {false, true, 1.5, 1}, {false, false, 1, 2}} {
					want := gtaReference(n, ts, scale, w, mode.consensus, mode.normalize, mode.divisor, mode.lambda)
					got := make([]float32, n)
					gtaIntoGo(got, ts, scale, w, mode.consensus, mode.normalize, mode.divisor, mode.lambda)
					sameAsReference(t, want, got, "gtaIntoGo")
					for _, k := range sets {
						if ownKernel(t, k, "gtaInto", k.gtaInto, gtaIntoGo) {
							got := make([]float32, n)
							k.gtaInto(got, ts, scale, w, mode.consensus, mode.normalize, mode.divisor, mode.lambda)
							sameBits(t, want, got, k.name+" gtaInto")
						}
					}
				}
			}
		}
	}
}
