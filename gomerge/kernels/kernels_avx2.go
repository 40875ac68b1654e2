//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"simd/archsimd"
	"unsafe"
)

// The vector kernels that are the same code at every vector width, written
// here once, for the 8 lanes of AVX2 (lanesAVX2). The AVX-512 versions are
// generated from this file (go generate, directive in doc.go: internal/gen512
// writes kernels_avx512_gen.go): lanesAVX2 becomes lanes512 (16), archsimd's
// 8-lane types and functions their 16-lane ones (Float32x8 Float32x16,
// LoadFloat32x8 LoadFloat32x16, ...), fooAVX2 becomes foo512 and any other
// name declared here gets 16 appended (vecs vecs16). So no lane count,
// lane mask (such as &^ 7) or 8-lane name other than archsimd's may appear
// here but through lanesAVX2 (the generator refuses them); a kernel whose
// code differs by width (absBand: a permutation table here, a compress
// there) is written by hand in kernels_simd.go and kernels_avx512.go.
//
// Every lane does the operations of the portable version in the same order,
// so results are bit-identical at every width.

// lanesAVX2 is the number of float32 lanes of an AVX2 vector.
const lanesAVX2 = 8

func maxAbsBitsAVX2(x []float32) uint32 {
	v := vecs(x)
	absMask := archsimd.BroadcastInt32x8(math.MaxInt32)
	acc := archsimd.BroadcastInt32x8(0)
	for i := range v {
		acc = acc.Max(archsimd.LoadFloat32x8(&v[i]).AsInt32x8().And(absMask))
	}
	var lanes [lanesAVX2]int32
	acc.Store(&lanes)
	m := maxAbsBitsGo(x[lanesAVX2*len(v):])
	for _, l := range lanes {
		m = max(m, uint32(l))
	}
	return m
}

// vecs views x[:lanesAVX2*(len(x)/lanesAVX2)] as vectors: indexing them
// needs no per-load slicing, which costs more than the vector work itself.
func vecs(x []float32) [][lanesAVX2]float32 {
	if len(x) < lanesAVX2 {
		return nil // no whole vector (and no pointer to one past the data)
	}
	return unsafe.Slice((*[lanesAVX2]float32)(unsafe.Pointer(unsafe.SliceData(x))), len(x)/lanesAVX2)
}

// The vector kernels take the tensors four at a time (a slice of slices in
// the inner loop is three times slower): a group is padded with tensors
// whose threshold keeps nothing, which add +0 and change no result.
type group struct {
	t  [4][][lanesAVX2]float32
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

// pruned loads one vector of values, zeroing those whose magnitude (bits
// And absMask) is not above the threshold.
func pruned(p *[lanesAVX2]float32, th, absMask archsimd.Int32x8) archsimd.Float32x8 {
	v := archsimd.LoadFloat32x8(p)
	return v.Masked(v.AsInt32x8().And(absMask).Greater(th))
}

func tiesIntoAVX2(out []float32, ts [][]float32, thr []uint32, w []float32, frequency bool) {
	nWhole := len(out) &^ (lanesAVX2 - 1) // the elements in whole vectors
	zero := archsimd.BroadcastFloat32x8(0)
	one := archsimd.BroadcastFloat32x8(1)
	absMask, signBit := archsimd.BroadcastInt32x8(math.MaxInt32), archsimd.BroadcastInt32x8(math.MinInt32)
	gs := make([]group, (len(ts)+3)/4)
	// the pruned values of one block, per tensor (padding included), and the block's sums
	scratch := make([][lanesAVX2]float32, 4*len(gs)*kernelBlock/lanesAVX2)
	var votesBuf, sumBuf, countBuf [kernelBlock / lanesAVX2][lanesAVX2]float32
	for lo := 0; lo < nWhole; lo += kernelBlock {
		hi := min(lo+kernelBlock, nWhole)
		setGroups(gs, ts, thr, w, lo, hi)
		votes, sum, count := votesBuf[:(hi-lo)/lanesAVX2], sumBuf[:(hi-lo)/lanesAVX2], countBuf[:(hi-lo)/lanesAVX2]
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
	if nWhole < len(out) {
		tiesIntoGo(out[nWhole:], tails(ts, nWhole), thr, w, frequency)
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
	nWhole := len(out) &^ (lanesAVX2 - 1) // the elements in whole vectors
	var sumBuf [kernelBlock]float32
	absMask := archsimd.BroadcastInt32x8(math.MaxInt32)
	gs := make([]group, (len(ts)+3)/4)
	for lo := 0; lo < nWhole; lo += kernelBlock {
		hi := min(lo+kernelBlock, nWhole)
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
	if nWhole < len(out) {
		prunedSumIntoGo(out[nWhole:], tails(ts, nWhole), thr, w)
	}
}
