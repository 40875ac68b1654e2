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
// magnitude_based_pruning). It selects the threshold in O(n), by a radix
// histogram of the float bits and a quickselect, never sorting. Among entries equal to
// the k-th magnitude the first ones in memory order are kept (torch breaks
// such ties arbitrarily).
func MagnitudePrune(t []float32, density float64) {
	MagnitudePruneInto(t, t, density)
}

// MagnitudePruneInto writes src magnitude-pruned into dst (which may be src).
func MagnitudePruneInto(dst, src []float32, density float64) {
	dst = dst[:len(src)]
	k := PruneK(density, len(src))
	if k >= len(src) {
		copy(dst, src)
		return
	}
	if k <= 0 {
		clear(dst)
		return
	}
	thr, _ := kthLargestAbsBits(src, k)
	// branch-free: keep |src[i]| >= thr (zero the others by masking their bits)
	kept := 0
	for i, v := range src {
		b := math.Float32bits(v) & 0x7fffffff
		keep := uint32(int64(b)-int64(thr))>>31 ^ 1 // 1 when b >= thr
		kept += int(keep)
		dst[i] = math.Float32frombits(math.Float32bits(v) & -keep)
	}
	// entries equal to the threshold beyond the k-th are dropped, last ones first
	for i := len(dst) - 1; i >= 0 && kept > k; i-- {
		if math.Float32bits(dst[i])&0x7fffffff == thr {
			dst[i] = 0
			kept--
		}
	}
}

// kthLargestAbsBits returns the bit pattern of the k-th largest |t[i]|
// (1-based k) and how many entries are strictly larger. Non-negative
// float32 values order like their bit patterns, so the selection works on
// integers: a histogram of the top 11 bits finds the bucket of the k-th
// value, then a quickselect among that bucket's entries finds the value.
func kthLargestAbsBits(t []float32, k int) (thr uint32, above int) {
	const shift = 20 // 31 magnitude bits: 11 in the bucket, 20 below
	var hist [1 << 11]int32
	for _, v := range t {
		hist[(math.Float32bits(v)&0x7fffffff)>>shift]++
	}
	bucket := len(hist) - 1
	for ; bucket > 0; bucket-- {
		if above+int(hist[bucket]) >= k {
			break
		}
		above += int(hist[bucket])
	}
	cand := make([]uint32, 0, hist[bucket])
	for _, v := range t {
		if b := math.Float32bits(v) & 0x7fffffff; int(b>>shift) == bucket {
			cand = append(cand, b)
		}
	}
	// the (k-above)-th largest candidate
	thr = selectKthLargest(cand, k-above)
	for _, b := range cand {
		if b > thr {
			above++
		}
	}
	return thr, above
}

// selectKthLargest returns the k-th largest value of x (1-based), reordering
// x (Hoare's quickselect with a median-of-three pivot).
func selectKthLargest(x []uint32, k int) uint32 {
	lo, hi, target := 0, len(x)-1, k-1 // index in descending order
	for lo < hi {
		mid := lo + (hi-lo)/2
		a, b, c := x[lo], x[mid], x[hi]
		pivot := max(min(a, b), min(max(a, b), c))
		i, j := lo, hi
		for i <= j {
			for x[i] > pivot {
				i++
			}
			for x[j] < pivot {
				j--
			}
			if i <= j {
				x[i], x[j] = x[j], x[i]
				i++
				j--
			}
		}
		switch {
		case target <= j:
			hi = j
		case target >= i:
			lo = i
		default:
			return x[target]
		}
	}
	return x[target]
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

// MaskPrune is RandomPrune with a given keep-mask (one byte per element,
// non-zero keeps), for masks drawn by the caller (torch's generator).
func MaskPrune(t []float32, mask []byte, density float64, rescale bool) {
	if density >= 1 {
		return
	}
	d := float32(density)
	mask = mask[:len(t)]
	for i, v := range t {
		if mask[i] == 0 {
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
