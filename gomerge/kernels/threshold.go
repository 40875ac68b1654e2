package kernels

import (
	"math"
	"unsafe"

	"gomerge/gomerge/internal/pool"
)

// The threshold of magnitude pruning, selected in O(n) without sorting.

// PruneK is PEFT's number of values kept by magnitude pruning:
// int(density * numel), the float64 product truncated toward zero.
func PruneK(density float64, n int) int {
	return int(density * float64(n))
}

// MagnitudeThreshold returns the magnitude bits thr of PEFT's magnitude
// pruning of t: entries whose |bits| are at least thr are kept (thr 0
// keeps all, KeepNone none), how many entries that keeps, and
// k = int(density * len(t)). kept exceeds k only when several entries
// equal the k-th magnitude.
func MagnitudeThreshold(t []float32, density float64) (thr uint32, kept, k int) {
	k = PruneK(density, len(t))
	if k >= len(t) {
		return 0, len(t), k
	}
	if k <= 0 {
		return KeepNone, 0, k
	}
	thr, above, equal := KthLargestAbsBits(t, k)
	return thr, above + equal, k
}

// KthLargestAbsBits returns the bit pattern of the k-th largest |t[i]|
// (1-based k), how many entries are strictly larger and how many equal it.
// Non-negative float32 values order like their bit patterns, so the
// selection works on integers, in O(n): a sample of t gives a narrow band
// of values that holds the k-th with near certainty, one (vector) pass
// counts the entries above the band and collects those inside it, a
// histogram over the band narrows them to one bucket, and a quickselect
// there finds the value. When the band misses, a histogram of the top 11
// bits finds the bucket of the k-th value instead.
func KthLargestAbsBits(t []float32, k int) (thr uint32, above, equal int) {
	thr, above, equal, _ = kthLargestAbsBitsBanded(t, k)
	return thr, above, equal
}

// kthLargestAbsBitsBanded is KthLargestAbsBits, also saying whether the
// sampled band held the k-th value (false: the histogram found it).
func kthLargestAbsBitsBanded(t []float32, k int) (thr uint32, above, equal int, banded bool) {
	var cand []uint32
	if len(t) >= bandMinLen {
		lo, hi, capacity := sampleBand(t, k)
		buf := pool.Get(capacity)
		defer pool.Put(buf)
		cand = float32AsUint32(buf)
		var n int
		if above, n = active.absBand(t, lo, hi, cand); n < 0 || above >= k || above+n < k {
			cand = nil // the band missed the k-th value (or overflowed)
		} else {
			var more int
			cand, more = rangeBucket(cand[:n], lo, hi, k-above)
			above += more
		}
	}
	banded = cand != nil
	if !banded {
		cand, above = histogramBucket(t, k)
	}
	// the (k-above)-th largest candidate
	thr = selectKthLargest(cand, k-above)
	for _, b := range cand {
		if b > thr {
			above++
		} else if b == thr {
			equal++
		}
	}
	return thr, above, equal, banded
}

// bandMinLen is the smallest tensor whose threshold is found by sampling.
const bandMinLen = 4096

// sampleBand returns a range [lo, hi] of magnitude bits that holds the k-th
// largest |t[i]| unless the sample misleads (about 3 in 1000 tensors), and
// a candidate buffer size that holds the band's entries with a wide margin.
func sampleBand(t []float32, k int) (lo, hi uint32, capacity int) {
	n := len(t)
	s := min(2048, max(256, n>>6))
	sample := make([]uint32, s)
	for i := range sample {
		sample[i] = math.Float32bits(t[sampleIndex(i, n, s)]) & 0x7fffffff
	}
	// the k-th value's rank in the sample is about p*s, give or take 3 standard deviations
	p := float64(k) / float64(n)
	r := p * float64(s)
	m := 3*math.Sqrt(r*(1-p)) + 2
	hiRank, loRank := max(1, int(r-m)), min(s, max(int(r+m)+1, 2))
	hi = selectKthLargest(sample, hiRank)
	// the sample is now partitioned around index hiRank-1: the loRank-th largest is after it
	lo = selectKthLargest(sample[hiRank:], loRank-hiRank)
	return lo, hi, min(n, 2*n*(loRank-hiRank+1)/s+1024) + 16
}

// sampleIndex is the index of sample i of s drawn from n entries: one entry
// of each stretch of n/s, at a place within it that a fixed hash of i
// picks. A fixed offset would read one column of a matrix whose rows divide
// the stride (a dense delta's rows of 4096 against a stride of 8192), and
// the values of one column are not those of the whole: a low-rank delta
// B A scales one column of A by every row of B. The hash is splitmix64's
// finalizer, so the sample, and the band, are the same on every run.
func sampleIndex(i, n, s int) int {
	h := uint64(i) + 0x9e3779b97f4a7c15
	h = (h ^ h>>30) * 0xbf58476d1ce4e5b9
	h = (h ^ h>>27) * 0x94d049bb133111eb
	h ^= h >> 31
	w := n / s
	return i*w + int(h%uint64(w))
}

// rangeBucket narrows the candidates, values within [lo, hi], to those of
// the histogram bucket (2048 buckets over the range) that holds the k-th
// largest; it returns them (in cand's memory) and how many candidates lie
// in higher buckets.
func rangeBucket(cand []uint32, lo, hi uint32, k int) (bucketed []uint32, above int) {
	shift := uint(0)
	for (hi-lo)>>shift >= 2048 {
		shift++
	}
	var hist [2048]int32
	for _, b := range cand {
		hist[(b-lo)>>shift]++
	}
	bucket := len(hist) - 1
	for ; bucket > 0; bucket-- {
		if above+int(hist[bucket]) >= k {
			break
		}
		above += int(hist[bucket])
	}
	n := 0
	for _, b := range cand {
		if (b-lo)>>shift == uint32(bucket) {
			cand[n] = b
			n++
		}
	}
	return cand[:n], above
}

// histogramBucket finds the bucket of the k-th largest magnitude in a
// histogram of the top 11 bits and returns the bucket's entries and the
// number of entries in higher buckets.
func histogramBucket(t []float32, k int) (cand []uint32, above int) {
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
	cand = make([]uint32, 0, hist[bucket])
	for _, v := range t {
		if b := math.Float32bits(v) & 0x7fffffff; int(b>>shift) == bucket {
			cand = append(cand, b)
		}
	}
	return cand, above
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

// float32AsUint32 views float32 scratch memory as uint32 values.
func float32AsUint32(x []float32) []uint32 {
	return unsafe.Slice((*uint32)(unsafe.Pointer(unsafe.SliceData(x))), len(x))
}
