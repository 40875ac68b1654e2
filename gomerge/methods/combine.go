package methods

import (
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/kernels"
	"gomerge/gomerge/parallel"
)

// Combination is one of PEFT's element-wise ways to combine task tensors
// (merge_utils), given by a method row's Pruning and TIES: task_arithmetic
// (neither), magnitude_prune and dare_linear (PruneMagnitude, PruneDARE),
// ties and dare_ties (the same with TIES). The same function serves the
// factors (family 1) and the dense updates (family 2).
type Combination struct {
	Pruning    Pruning // PruneNone, PruneMagnitude or PruneDARE (the others are mergekit's: merge_generalized.go)
	TIES       bool    // sign election and disjoint mean
	Density    float64 // fraction kept by the pruning methods
	SignMethod string  // "total" or "frequency", for TIES
}

// combineGrain is the least number of elements combined per goroutine.
const combineGrain = 1 << 14

// Apply combines the tensors with the weights and returns the result.
// With owned, the tensors are the caller's scratch: they may be pruned in
// place and the result is written over tensors[0]. Otherwise they are
// read-only (views of files or of a model's memory) and left untouched.
// dare(i, t) applies DARE's random mask of tensor i to t, in place.
//
// Magnitude pruning does not write pruned copies: each tensor gets a
// threshold and the combining kernel skips the entries below it. Only a
// tensor with several entries equal to its k-th magnitude is copied, with
// the last of those zeroed, so that exactly k entries stay.
func (c Combination) Apply(tensors [][]float32, weights []float32, dare func(i int, t []float32), owned bool) []float32 {
	ts := append([][]float32(nil), tensors...)
	thr := make([]uint32, len(ts))  // 0 keeps every entry
	copied := make([]bool, len(ts)) // ts[i] is a pruned copy, back to the pool at the end
	defer func() {
		for i, c := range copied {
			if c {
				pool.Put(ts[i])
			}
		}
	}()
	// copyFor returns a copy of tensor i to prune in place (the tensor itself when owned)
	copyFor := func(i int) []float32 {
		if owned {
			return ts[i]
		}
		t := pool.Get(len(ts[i]))
		copy(t, ts[i])
		copied[i] = true
		return t
	}
	if c.Density < 1 { // PEFT's prune() returns the tensor untouched for density >= 1
		var each func(i int)
		switch c.Pruning {
		case PruneMagnitude:
			each = func(i int) {
				var kept, k int
				if thr[i], kept, k = kernels.MagnitudeThreshold(ts[i], c.Density); kept > k {
					t := copyFor(i)
					dropLastEqual(t, thr[i], kept-k)
					ts[i] = t
				}
			}
		case PruneDARE:
			each = func(i int) {
				t := copyFor(i)
				dare(i, t)
				ts[i] = t
			}
		}
		if each != nil { // one goroutine per tensor when tensors are large
			parallel.For(len(ts), max(1, combineGrain*4/max(1, len(ts[0]))), func(lo, hi int) {
				for i := lo; i < hi; i++ {
					each(i)
				}
			})
		}
	}
	out := tensors[0] // each element is written after its inputs are read: in place is safe
	if !owned {
		out = pool.Get(len(tensors[0]))
	}
	ties := c.TIES
	frequency := c.SignMethod == kernels.SignFrequency
	parallel.For(len(out), combineGrain, func(lo, hi int) {
		sub := make([][]float32, len(ts))
		for i, t := range ts {
			sub[i] = t[lo:hi]
		}
		if ties {
			kernels.TiesInto(out[lo:hi], sub, thr, weights, frequency)
		} else {
			kernels.PrunedSumInto(out[lo:hi], sub, thr, weights)
		}
	})
	return out
}

// ScaleInto writes x * w1 * w2 into dst, rounding after each product as
// torch does for `tensor * w1 * w2` with Python scalars.
func ScaleInto(dst, x []float32, w1, w2 float32) {
	for i, v := range x {
		dst[i] = (v * w1) * w2
	}
}
