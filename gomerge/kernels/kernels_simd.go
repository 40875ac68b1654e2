//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"math/bits"
	"simd/archsimd"

	"golang.org/x/sys/cpu"
)

// The vector sets of this build (kernelselect.go chooses among them), and
// the AVX2 kernels (8 float32 lanes) that are AVX2's own: the others are
// written once for every width in kernels_avx2.go (whose AVX-512 versions
// are generated) or are in dots_simd.go and gta_simd.go. Every lane does the
// operations of the portable version in the same order, so results are
// bit-identical. No vector value may live in a package-level variable: its
// initialiser would run on every CPU, before the choice (SIGILL without
// AVX2).
var vectorKernels = []kernels{
	{
		name: "avx2",
		missing: missingX86("avx2", archsimd.X86.AVX2,
			x86Feature{"avx", cpu.X86.HasAVX}, x86Feature{"avx2", cpu.X86.HasAVX2}),
		maxAbsBits:    maxAbsBitsAVX2,
		absBand:       absBandAVX2,
		tiesInto:      tiesIntoAVX2,
		prunedSumInto: prunedSumIntoAVX2,
		decodeHalf:    decodeHalfGo,
		encodeHalf:    encodeHalfGo,
		dots:          dotsAVX2,
		axpyRows:      axpyRowsAVX2,
		denseRow:      denseRowAVX2,
		magnitudeRank: magnitudeRankAVX2,
		mulTInto:      mulTIntoAVX2,
		gtaInto:       gtaIntoAVX2,
		lowRankRows:   lowRankRowsAVX2,

		mtTwist:         mtTwistAVX2,
		temperBernoulli: temperBernoulliAVX2,
	},
	{
		name: "avx512",
		missing: missingX86("avx512", archsimd.X86.AVX512,
			x86Feature{"avx512f", cpu.X86.HasAVX512F}, x86Feature{"avx512cd", cpu.X86.HasAVX512CD},
			x86Feature{"avx512bw", cpu.X86.HasAVX512BW}, x86Feature{"avx512dq", cpu.X86.HasAVX512DQ},
			x86Feature{"avx512vl", cpu.X86.HasAVX512VL}),
		maxAbsBits:    maxAbsBits512,
		absBand:       absBand512,
		tiesInto:      tiesInto512,
		prunedSumInto: prunedSumInto512,
		decodeHalf:    decodeHalf512,
		encodeHalf:    encodeHalf512,
		// the AVX2 versions (dots_simd.go, gta_simd.go): 16-lane dots would add in another order
		dots:          dotsAVX2,
		axpyRows:      axpyRowsAVX2,
		denseRow:      denseRowAVX2,
		magnitudeRank: magnitudeRankAVX2,
		mulTInto:      mulTIntoAVX2,
		gtaInto:       gtaIntoAVX2,
		lowRankRows:   lowRankRows512,

		mtTwist:         mtTwist512,
		temperBernoulli: temperBernoulli512,
	},
}

// x86Feature is a CPU feature (as /proc/cpuinfo names it) and whether this
// CPU and its operating system support it.
type x86Feature struct {
	name string
	has  bool
}

// missingX86 returns a kernels.missing that lists the features this CPU
// lacks, or the set's own name when Go's runtime, which the vector code
// generation relies on, sees no support for it.
func missingX86(set string, runtimeHas func() bool, features ...x86Feature) func() []string {
	return func() []string {
		var missing []string
		for _, f := range features {
			if !f.has {
				missing = append(missing, f.name)
			}
		}
		if len(missing) == 0 && !runtimeHas() {
			missing = append(missing, set+" (as Go's runtime sees this CPU)")
		}
		return missing
	}
}

// absBandAVX2 tests 8 magnitudes at once. AVX2 has no compress
// instruction: the lanes inside the band are packed to the front by a
// permutation that the comparison's bit mask looks up in leftPack, and all
// 8 lanes are stored (those past the packed ones are overwritten next).
func absBandAVX2(t []float32, lo, hi uint32, cand []uint32) (above, n int) {
	v := vecs(t)
	limit := len(cand) - 16
	absMask := archsimd.BroadcastInt32x8(math.MaxInt32)
	vhi := archsimd.BroadcastInt32x8(int32(hi))
	vlo := archsimd.BroadcastInt32x8(int32(lo) - 1) // lo >= 0 as magnitudes are below 2^31
	for i := range v {
		if n > limit {
			return 0, -1
		}
		b := archsimd.LoadFloat32x8(&v[i]).AsInt32x8().And(absMask)
		gt := b.Greater(vhi).ToBits()
		above += bits.OnesCount8(gt)
		in := b.Greater(vlo).ToBits() &^ gt
		b.AsUint32x8().Permute(archsimd.LoadUint32x8(&leftPack[in])).Store((*[8]uint32)(cand[n:]))
		n += bits.OnesCount8(in)
	}
	a, m := absBandGo(t[8*len(v):], lo, hi, cand[min(n, len(cand)):])
	if m < 0 || n+m > limit {
		return 0, -1
	}
	return above + a, n + m
}

// leftPack[m] lists the lanes set in the 8-bit mask m, in order: the
// permutation that packs them to the front (plain integers, no vectors).
var leftPack = func() (t [256][8]uint32) {
	for m := range t {
		k := 0
		for j := range 8 {
			if m>>j&1 == 1 {
				t[m][k] = uint32(j)
				k++
			}
		}
	}
	return t
}()

func tails(ts [][]float32, from int) [][]float32 {
	out := make([][]float32, len(ts))
	for i, t := range ts {
		out[i] = t[from:]
	}
	return out
}
