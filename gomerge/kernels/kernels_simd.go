//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"math/bits"
	"simd/archsimd"
	"unsafe"

	"golang.org/x/sys/cpu"
)

// Vector kernels with 8 float32 lanes (AVX2), and the vector sets of this
// build (kernelselect.go chooses among them). Every lane does the operations
// of the portable version in the same order, so results are bit-identical.
// No vector value may live in a package-level variable: its initialiser
// would run on every CPU, before the choice (SIGILL without AVX2).
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

func maxAbsBitsAVX2(x []float32) uint32 {
	v := vecs(x)
	absMask := archsimd.BroadcastInt32x8(math.MaxInt32)
	acc := archsimd.BroadcastInt32x8(0)
	for i := range v {
		acc = acc.Max(archsimd.LoadFloat32x8(&v[i]).AsInt32x8().And(absMask))
	}
	var lanes [8]int32
	acc.Store(&lanes)
	m := maxAbsBitsGo(x[8*len(v):])
	for _, l := range lanes {
		m = max(m, uint32(l))
	}
	return m
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

// vecs views x[:8*(len(x)/8)] as vectors: indexing them needs no
// per-load slicing, which costs more than the vector work itself.
func vecs(x []float32) [][8]float32 {
	if len(x) < 8 {
		return nil // no whole vector (and no pointer to one past the data)
	}
	return unsafe.Slice((*[8]float32)(unsafe.Pointer(unsafe.SliceData(x))), len(x)/8)
}

// The vector kernels take the tensors four at a time (a slice of slices in
// the inner loop is three times slower): a group is padded with tensors
// whose threshold keeps nothing, which add +0 and change no result.
type group struct {
	t  [4][][8]float32
	th [4]archsimd.Int32x8 // thr-1 as int32: a magnitude is kept when (signed) greater
	w  [4]archsimd.Float32x8
}

// setGroups points the groups at the block [lo, hi) of the tensors.
func setGroups(gs []group, ts [][]float32, thr []uint32, w []float32, lo, hi int) {
	for i := range 4 * len(gs) {
		g := &gs[i/4]
		if i < len(ts) {
			g.t[i%4] = vecs(ts[i][lo:hi])
			g.th[i%4] = archsimd.BroadcastInt32x8(int32(thr[i] - 1))
			g.w[i%4] = archsimd.BroadcastFloat32x8(w[i])
		} else {
			g.t[i%4] = vecs(ts[0][lo:hi])
			g.th[i%4] = archsimd.BroadcastInt32x8(math.MaxInt32) // keeps nothing
			g.w[i%4] = archsimd.BroadcastFloat32x8(0)
		}
	}
}

// pruned loads 8 values, zeroing those whose magnitude (bits And absMask)
// is not above the threshold.
func pruned(p *[8]float32, th, absMask archsimd.Int32x8) archsimd.Float32x8 {
	v := archsimd.LoadFloat32x8(p)
	return v.Masked(v.AsInt32x8().And(absMask).Greater(th))
}

func tiesIntoAVX2(out []float32, ts [][]float32, thr []uint32, w []float32, frequency bool) {
	n8 := len(out) &^ 7
	zero := archsimd.BroadcastFloat32x8(0)
	one := archsimd.BroadcastFloat32x8(1)
	absMask, signBit := archsimd.BroadcastInt32x8(math.MaxInt32), archsimd.BroadcastInt32x8(math.MinInt32)
	gs := make([]group, (len(ts)+3)/4)
	// the pruned values of one block, per tensor (padding included), and the block's sums
	scratch := make([][8]float32, 4*len(gs)*kernelBlock/8)
	var votesBuf, sumBuf, countBuf [kernelBlock / 8][8]float32
	for lo := 0; lo < n8; lo += kernelBlock {
		hi := min(lo+kernelBlock, n8)
		setGroups(gs, ts, thr, w, lo, hi)
		votes, sum, count := votesBuf[:(hi-lo)/8], sumBuf[:(hi-lo)/8], countBuf[:(hi-lo)/8]
		nv := len(votes)
		clear(votes)
		for gi := range gs {
			g := &gs[gi]
			a, b, c, d := g.t[0][:nv], g.t[1][:nv], g.t[2][:nv], g.t[3][:nv]
			pa, pb, pc, pd := scratch[(4*gi)*nv:][:nv], scratch[(4*gi+1)*nv:][:nv], scratch[(4*gi+2)*nv:][:nv], scratch[(4*gi+3)*nv:][:nv]
			for j := range votes {
				va, vb, vc, vd := pruned(&a[j], g.th[0], absMask), pruned(&b[j], g.th[1], absMask), pruned(&c[j], g.th[2], absMask), pruned(&d[j], g.th[3], absMask)
				va.Store(&pa[j])
				vb.Store(&pb[j])
				vc.Store(&pc[j])
				vd.Store(&pd[j])
				acc := archsimd.LoadFloat32x8(&votes[j])
				if frequency {
					acc = acc.Add(one.Masked(va.Greater(zero)).Sub(one.Masked(va.Less(zero))))
					acc = acc.Add(one.Masked(vb.Greater(zero)).Sub(one.Masked(vb.Less(zero))))
					acc = acc.Add(one.Masked(vc.Greater(zero)).Sub(one.Masked(vc.Less(zero))))
					acc = acc.Add(one.Masked(vd.Greater(zero)).Sub(one.Masked(vd.Less(zero))))
				} else {
					acc = acc.Add(va).Add(vb).Add(vc).Add(vd)
				}
				acc.Store(&votes[j])
			}
		}
		clear(sum)
		clear(count)
		for gi := range gs {
			g := &gs[gi]
			pa, pb, pc, pd := scratch[(4*gi)*nv:][:nv], scratch[(4*gi+1)*nv:][:nv], scratch[(4*gi+2)*nv:][:nv], scratch[(4*gi+3)*nv:][:nv]
			for j := range votes {
				// the elected sign's bit: set where votes < 0 (-0 and NaN elect +1)
				e := signBit.Masked(archsimd.LoadFloat32x8(&votes[j]).Less(zero))
				s, n := archsimd.LoadFloat32x8(&sum[j]), archsimd.LoadFloat32x8(&count[j])
				s, n = agreeing(s, n, archsimd.LoadFloat32x8(&pa[j]), g.w[0], e, one)
				s, n = agreeing(s, n, archsimd.LoadFloat32x8(&pb[j]), g.w[1], e, one)
				s, n = agreeing(s, n, archsimd.LoadFloat32x8(&pc[j]), g.w[2], e, one)
				s, n = agreeing(s, n, archsimd.LoadFloat32x8(&pd[j]), g.w[3], e, one)
				s.Store(&sum[j])
				n.Store(&count[j])
			}
		}
		o := vecs(out[lo:hi])[:nv]
		for j := range o {
			archsimd.LoadFloat32x8(&sum[j]).Div(archsimd.LoadFloat32x8(&count[j]).Max(one)).Store(&o[j])
		}
	}
	if n8 < len(out) {
		tiesIntoGo(out[n8:], tails(ts, n8), thr, w, frequency)
	}
}

// agreeing adds (v * w) * agree to sum and agree to count, where agree is
// 1 for the non-zero values of the elected sign, that is when v's bits xor
// the elected sign bit make a positive int32 (as in the portable version:
// (v * w) * 0 for the others, so that Inf * 0 gives NaN there too).
func agreeing(sum, count, v, w archsimd.Float32x8, elected archsimd.Int32x8, one archsimd.Float32x8) (archsimd.Float32x8, archsimd.Float32x8) {
	a := one.Masked(v.AsInt32x8().Xor(elected).Greater(archsimd.BroadcastInt32x8(0)))
	return sum.Add(v.Mul(w).Mul(a)), count.Add(a)
}

func prunedSumIntoAVX2(out []float32, ts [][]float32, thr []uint32, w []float32) {
	n8 := len(out) &^ 7
	var sumBuf [kernelBlock]float32
	absMask := archsimd.BroadcastInt32x8(math.MaxInt32)
	gs := make([]group, (len(ts)+3)/4)
	for lo := 0; lo < n8; lo += kernelBlock {
		hi := min(lo+kernelBlock, n8)
		sum := vecs(sumBuf[:hi-lo])
		clear(sum)
		setGroups(gs, ts, thr, w, lo, hi)
		for _, g := range gs {
			a, b, c, d := g.t[0][:len(sum)], g.t[1][:len(sum)], g.t[2][:len(sum)], g.t[3][:len(sum)]
			for j := range sum {
				s := archsimd.LoadFloat32x8(&sum[j])
				s = s.Add(pruned(&a[j], g.th[0], absMask).Mul(g.w[0]))
				s = s.Add(pruned(&b[j], g.th[1], absMask).Mul(g.w[1]))
				s = s.Add(pruned(&c[j], g.th[2], absMask).Mul(g.w[2]))
				s = s.Add(pruned(&d[j], g.th[3], absMask).Mul(g.w[3]))
				s.Store(&sum[j])
			}
		}
		copy(out[lo:hi], sumBuf[:hi-lo])
	}
	if n8 < len(out) {
		prunedSumIntoGo(out[n8:], tails(ts, n8), thr, w)
	}
}
