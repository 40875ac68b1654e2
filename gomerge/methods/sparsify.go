package methods

import (
	"hash/fnv"
	"math"
	"math/rand/v2"

	"gomerge/gomerge/kernels"
)

// MagnitudePrune keeps the k = int(density * len(t)) entries of t with the
// largest magnitude and zeroes the rest, in place (PEFT's
// magnitude_based_pruning). It selects the threshold in O(n), never
// sorting (see kernels.MagnitudeThreshold). Among entries equal to the k-th
// magnitude the first ones in memory order are kept (torch breaks such ties
// arbitrarily).
func MagnitudePrune(t []float32, density float64) {
	MagnitudePruneInto(t, t, density)
}

// MagnitudePruneInto writes src magnitude-pruned into dst (which may be src).
func MagnitudePruneInto(dst, src []float32, density float64) {
	dst = dst[:len(src)]
	thr, kept, k := kernels.MagnitudeThreshold(src, density)
	for i, v := range src {
		dst[i] = kernels.KeepAbove(v, thr)
	}
	dropLastEqual(dst, thr, kept-k)
}

// dropLastEqual zeroes the last n entries of t whose magnitude bits are thr:
// of several entries equal to the k-th magnitude, the first ones in memory
// order are kept.
func dropLastEqual(t []float32, thr uint32, n int) {
	for i := len(t) - 1; i >= 0 && n > 0; i-- {
		if math.Float32bits(t[i])&0x7fffffff == thr {
			t[i] = 0
			n--
		}
	}
}

// RandomPrune is DARE's random pruning, in place: each entry is kept with
// probability density (a Bernoulli draw from rng) and, with rescale, kept
// entries are divided by density in float32, as PEFT's random_pruning does.
func RandomPrune(t []float32, density float64, rescale bool, rng *rand.PCG) {
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
	// Without branches on the mask (DARE's masks are random: a branch per element mispredicts often): every
	// element is rescaled, then the bits of the masked ones cleared (+0, as a branch would write).
	for i, v := range t {
		if rescale {
			v /= d
		}
		keep := uint32(mask[i])
		keep = -((keep | -keep) >> 31) // all ones for a non-zero mask byte, else zero
		t[i] = math.Float32frombits(math.Float32bits(v) & keep)
	}
}

// TensorRNG returns the random stream for one tensor of a merge: it depends
// only on the seed, the module and the tensor's label, never on which
// goroutine runs it, so the same seed gives the same masks on any number of
// cores.
func TensorRNG(seed uint64, module, label string) *rand.Rand {
	return rand.New(TensorSource(seed, module, label))
}

// TensorSource is TensorRNG's generator itself: its Uint64 draws are
// TensorRNG's, without the interface call per draw.
func TensorSource(seed uint64, module, label string) *rand.PCG {
	h := fnv.New64a()
	h.Write([]byte(module))
	h.Write([]byte{0})
	h.Write([]byte(label))
	return rand.NewPCG(seed, h.Sum64())
}
