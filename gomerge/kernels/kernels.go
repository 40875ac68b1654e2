package kernels

import "math"

// kernels is one implementation of the element-wise kernels behind magnitude
// pruning and Combination.Apply, and those of mergekit's methods and the
// randomized SVD (gta.go, dots.go): the portable Go one (portableKernels) or
// a vector one (kernels_simd.go: 8 lanes, AVX2; kernels_avx512.go: 16
// lanes, AVX-512) when the engine is built with GOEXPERIMENT=simd (as the
// Makefile and the Python build do) for amd64; a vector set may reuse some of the portable functions. The set in
// use (active) is chosen once, at start-up, from the CPU's features
// (kernelselect.go); no vector instruction runs before that choice, so the
// engine starts on every CPU. Every implementation gives bit-identical
// results (kernels_test.go, dots_test.go and gta_test.go compare each vector
// set with the portable one on a CPU that runs it). The exported functions
// below call the set in use.
//
// Magnitude pruning is expressed by thresholds: tensor i keeps its entries
// whose magnitude bits (float32 bits without the sign) are at least thr[i];
// the others count as zero. thr 0 keeps every entry, KeepNone none.
//
// Adding a kernel: a field here, its portable function in portableKernels,
// its entry point calling active, and, where it has vector versions, their
// entries in vectorKernels (kernels_simd.go); TestKernelSetsComplete fails
// while a set leaves a field nil.
type kernels struct {
	// name is the set's name for GOMERGE_KERNELS: "go", "avx2" or "avx512".
	name string
	// missing returns the CPU features that the set needs and this CPU
	// lacks; none when it runs here. It executes no vector instruction.
	missing func() []string
	// maxAbsBits returns the largest magnitude bits of x (0 when empty);
	// x holds a NaN or an Inf exactly when the result is >= NonFiniteBits.
	maxAbsBits func(x []float32) uint32
	// absBand counts the entries of t with magnitude bits above hi and
	// copies those within [lo, hi] into cand, returning how many. It gives
	// up (returning n < 0) when more than len(cand)-16 fall in the band.
	absBand func(t []float32, lo, hi uint32, cand []uint32) (above, n int)
	// tiesInto is TIES on one range: prune by thr, elect the majority sign
	// (by the sum of the values, or of their signs with frequency), then
	// average the weighted values that agree with it (PEFT's disjoint_merge).
	tiesInto func(out []float32, ts [][]float32, thr []uint32, w []float32, frequency bool)
	// prunedSumInto is sum_i w[i] * pruned(t_i), each product rounded to
	// float32 and summed in order, as torch does for a stacked tensor.
	prunedSumInto func(out []float32, ts [][]float32, thr []uint32, w []float32)
	// decodeHalf converts BF16 (bf16) or F16 bit patterns to float32.
	decodeHalf func(out []float32, raw []uint16, bf16 bool)
	// encodeHalf rounds float32 values to BF16 or F16 (to nearest even).
	encodeHalf func(out []uint16, x []float32, bf16 bool)
	// dots, axpyRows and denseRow are Dots, AxpyRows and DenseRow (dots.go).
	dots     func(out, xs, zs []float32, rows, l, n int)
	axpyRows func(dst, a []float32, xs [][]float32)
	denseRow func(dst, a []float32, xs [][]float32, s float32)
	// magnitudeRank and mulTInto are MagnitudeRank and MulTInto (dots.go).
	magnitudeRank func(mag []uint32, c int) int
	mulTInto      func(part, d, y []float32, rows, n, l int)
	// gtaInto is GTAInto (gta.go).
	gtaInto func(out []float32, ts [][]float32, scale, w []float32, consensus, normalize bool, divisor, lambda float32)
	// lowRankRows is LowRankRows (fuse.go).
	lowRankRows func(w []float32, coef, basis []float64, rows, cols, r int, to Rounding)
	// mtTwist and temperBernoulli are MT19937Twist and TemperBernoulli
	// (mt19937.go).
	mtTwist         func(state *[MTWords]uint32)
	temperBernoulli func(dst []byte, words []uint32, t uint32)
}

// portableKernels are the kernels in plain Go: they run on every CPU.
var portableKernels = kernels{
	name:          "go",
	missing:       func() []string { return nil },
	maxAbsBits:    maxAbsBitsGo,
	absBand:       absBandGo,
	tiesInto:      tiesIntoGo,
	prunedSumInto: prunedSumIntoGo,
	decodeHalf:    decodeHalfGo,
	encodeHalf:    encodeHalfGo,
	dots:          dotsGo,
	axpyRows:      axpyRowsGo,
	denseRow:      denseRowGo,
	magnitudeRank: magnitudeRankGo,
	mulTInto:      mulTIntoGo,
	gtaInto:       gtaIntoGo,
	lowRankRows:   lowRankRowsGo,

	mtTwist:         mtTwistGo,
	temperBernoulli: temperBernoulliGo,
}

// kernelSets are the implementations in this build, whether or not this CPU
// runs them: the portable one first, then vectorKernels (kernels_simd.go,
// or none: kernels_novec.go) from the slowest to the fastest.
var kernelSets = append([]kernels{portableKernels}, vectorKernels...)

// active is the set in use (kernelselect.go chooses it at start-up); the
// exported functions call its kernels.
var active = portableKernels

const (
	// NonFiniteBits are the magnitude bits of +Inf: a value is a NaN or an
	// Inf exactly when its magnitude bits are at least NonFiniteBits.
	NonFiniteBits = 0x7f800000
	// KeepNone is a threshold above every magnitude: it keeps no entry.
	KeepNone = 1 << 31
)

// MaxAbsBits returns the largest magnitude bits of x (0 when empty); x
// holds a NaN or an Inf exactly when the result is >= NonFiniteBits.
func MaxAbsBits(x []float32) uint32 { return active.maxAbsBits(x) }

// TiesInto is TIES on one range, into out: tensor i (of len(out) elements
// at least) is pruned by the threshold thr[i], the majority sign is elected
// by the sum of the values (or, with frequency, of their signs), and the
// values weighted by w that agree with it are averaged (PEFT's
// disjoint_merge over its calculate_majority_sign_mask).
func TiesInto(out []float32, ts [][]float32, thr []uint32, w []float32, frequency bool) {
	active.tiesInto(out, ts, thr, w, frequency)
}

// PrunedSumInto writes sum_i w[i] * pruned(ts[i]) into out, pruning tensor
// i by the threshold thr[i]; each product is rounded to float32 and the
// products are summed in order, as torch does for a stacked tensor.
func PrunedSumInto(out []float32, ts [][]float32, thr []uint32, w []float32) {
	active.prunedSumInto(out, ts, thr, w)
}

// DecodeHalf converts BF16 (bf16) or F16 bit patterns to float32 values,
// into out (raw holds len(out) values at least).
func DecodeHalf(out []float32, raw []uint16, bf16 bool) { active.decodeHalf(out, raw, bf16) }

// EncodeHalf rounds float32 values to BF16 (bf16) or F16 bit patterns (to
// nearest, ties to even, as torch does), into out (of len(x) values at
// least).
func EncodeHalf(out []uint16, x []float32, bf16 bool) { active.encodeHalf(out, x, bf16) }

// KeepAbove returns v when its magnitude bits are at least thr, else +0
// (without a branch): v pruned by the threshold thr.
func KeepAbove(v float32, thr uint32) float32 {
	b := math.Float32bits(v)
	keep := uint32(int64(b&0x7fffffff)-int64(thr))>>31 ^ 1
	return math.Float32frombits(b & -keep)
}

func maxAbsBitsGo(x []float32) uint32 {
	var m uint32
	for _, v := range x {
		m = max(m, math.Float32bits(v)&0x7fffffff)
	}
	return m
}

func absBandGo(t []float32, lo, hi uint32, cand []uint32) (above, n int) {
	limit := len(cand) - 16
	for _, v := range t {
		// without branches: every value is stored, and the count moves on only for those in the band
		b := math.Float32bits(v) & 0x7fffffff
		above += int((hi - b) >> 31)                  // b > hi (both are below 2^31)
		cand[min(n, limit)] = b                       // overwritten next unless in the band
		n += int(((b-lo)>>31 ^ 1) & ((hi-b)>>31 ^ 1)) // lo <= b <= hi
	}
	if n > limit {
		return 0, -1
	}
	return above, n
}

// kernelBlock is the number of elements the portable kernels combine at
// once: their per-element scratch stays in the L1 cache.
const kernelBlock = 1024

func tiesIntoGo(out []float32, ts [][]float32, thr []uint32, w []float32, frequency bool) {
	// each block is pruned into scratch, then PEFT's steps run on it as the reference primitives do
	method := SignTotal
	if frequency {
		method = SignFrequency
	}
	scratch := make([]float32, len(ts)*kernelBlock)
	pruned := make([][]float32, len(ts))
	var sign, sum, count [kernelBlock]float32
	for lo := 0; lo < len(out); lo += kernelBlock {
		hi := min(lo+kernelBlock, len(out))
		for i, t := range ts {
			p := scratch[i*kernelBlock : i*kernelBlock+hi-lo]
			for j, v := range t[lo:hi] {
				p[j] = KeepAbove(v, thr[i])
			}
			pruned[i] = p
		}
		electSignsInto(sign[:hi-lo], pruned, method)
		disjointMergeInto(sum[:hi-lo], count[:hi-lo], pruned, w, sign[:hi-lo])
		copy(out[lo:hi], sum[:hi-lo])
	}
}

func prunedSumIntoGo(out []float32, ts [][]float32, thr []uint32, w []float32) {
	var sum [kernelBlock]float32
	for lo := 0; lo < len(out); lo += kernelBlock {
		hi := min(lo+kernelBlock, len(out))
		acc := sum[:hi-lo]
		clear(acc)
		for i, t := range ts {
			t, th, wi := t[lo:hi], thr[i], w[i]
			for j, v := range t {
				acc[j] += KeepAbove(v, th) * wi
			}
		}
		copy(out[lo:hi], acc)
	}
}
