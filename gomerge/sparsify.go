package gomerge

import (
	"hash/fnv"
	"math"
	"math/rand/v2"
)

// PruneK is PEFT's number of values kept by magnitude pruning:
// int(density * numel), the float64 product truncated toward zero.
func PruneK(density float64, n int) int {
	return int(density * float64(n))
}

// MagnitudePrune keeps the k = int(density * len(t)) entries of t with the
// largest magnitude and zeroes the rest, in place (PEFT's
// magnitude_based_pruning). It selects the threshold in O(n) by a two-level
// radix histogram of the float bits, never sorting. Among entries equal to
// the k-th magnitude the first ones in memory order are kept (torch breaks
// such ties arbitrarily).
func MagnitudePrune(t []float32, density float64) {
	k := PruneK(density, len(t))
	if k >= len(t) {
		return
	}
	if k <= 0 {
		clear(t)
		return
	}
	thr, above := kthLargestAbsBits(t, k)
	ties := k - above // entries equal to the threshold that are kept
	for i, v := range t {
		b := math.Float32bits(v) & 0x7fffffff
		switch {
		case b > thr:
		case b == thr && ties > 0:
			ties--
		default:
			t[i] = 0
		}
	}
}

// kthLargestAbsBits returns the bit pattern of the k-th largest |t[i]|
// (1-based k) and how many entries are strictly larger. Non-negative
// float32 values order like their bit patterns, so the selection works on
// integers: a histogram of the high 16 bits finds the bucket of the k-th
// value, a second histogram of the low 16 bits inside that bucket finds it.
func kthLargestAbsBits(t []float32, k int) (thr uint32, above int) {
	var hist [1 << 16]int
	for _, v := range t {
		hist[(math.Float32bits(v)&0x7fffffff)>>16]++
	}
	hi := 0
	for hi = len(hist) - 1; hi >= 0; hi-- {
		if above+hist[hi] >= k {
			break
		}
		above += hist[hi]
	}
	clear(hist[:])
	for _, v := range t {
		if b := math.Float32bits(v) & 0x7fffffff; int(b>>16) == hi {
			hist[b&0xffff]++
		}
	}
	lo := 0
	for lo = len(hist) - 1; lo >= 0; lo-- {
		if above+hist[lo] >= k {
			break
		}
		above += hist[lo]
	}
	return uint32(hi)<<16 | uint32(lo), above
}

// RandomPrune is DARE's random pruning, in place: each entry is kept with
// probability density (a Bernoulli draw from rng) and, with rescale, kept
// entries are divided by density in float32, as PEFT's random_pruning does.
func RandomPrune(t []float32, density float64, rescale bool, rng *rand.Rand) {
	if density >= 1 {
		return
	}
	// keep when a uniform 64-bit draw is below density * 2^64
	f := density * 0x1p64
	keepAll := f >= 0x1p64
	limit := uint64(0)
	if !keepAll {
		limit = uint64(f)
	}
	d := float32(density)
	for i, v := range t {
		if !keepAll && rng.Uint64() >= limit {
			t[i] = 0
		} else if rescale {
			t[i] = v / d
		}
	}
}

// TensorRNG returns the random stream for one tensor of a merge: it depends
// only on the seed, the module and the tensor's label, never on which
// goroutine runs it, so the same seed gives the same masks on any number of
// cores.
func TensorRNG(seed uint64, module, label string) *rand.Rand {
	h := fnv.New64a()
	h.Write([]byte(module))
	h.Write([]byte{0})
	h.Write([]byte(label))
	return rand.New(rand.NewPCG(seed, h.Sum64()))
}
