//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"math/bits"
	"simd/archsimd"
	"unsafe"
)

// The kernels with 16 float32 lanes (AVX-512), twice as wide as those of
// kernels_simd.go and otherwise the same; the band's candidates are packed
// by the vector compress instruction, which AVX2 lacks.

// vecs16 views x[:16*(len(x)/16)] as vectors.
func vecs16(x []float32) [][16]float32 {
	if len(x) < 16 {
		return nil // no whole vector (and no pointer to one past the data)
	}
	return unsafe.Slice((*[16]float32)(unsafe.Pointer(unsafe.SliceData(x))), len(x)/16)
}

func maxAbsBits512(x []float32) uint32 {
	v := vecs16(x)
	absMask16 := archsimd.BroadcastInt32x16(math.MaxInt32)
	acc := archsimd.BroadcastInt32x16(0)
	for i := range v {
		acc = acc.Max(archsimd.LoadFloat32x16(&v[i]).AsInt32x16().And(absMask16))
	}
	var lanes [16]int32
	acc.Store(&lanes)
	m := maxAbsBitsGo(x[16*len(v):])
	for _, l := range lanes {
		m = max(m, uint32(l))
	}
	return m
}

func absBand512(t []float32, lo, hi uint32, cand []uint32) (above, n int) {
	v := vecs16(t)
	c := unsafe.Slice((*int32)(unsafe.Pointer(unsafe.SliceData(cand))), len(cand))
	limit := len(cand) - 16
	absMask16 := archsimd.BroadcastInt32x16(math.MaxInt32)
	vhi := archsimd.BroadcastInt32x16(int32(hi))
	vlo := archsimd.BroadcastInt32x16(int32(lo) - 1) // lo >= 0 as magnitudes are below 2^31
	for i := range v {
		if n > limit {
			return 0, -1
		}
		b := archsimd.LoadFloat32x16(&v[i]).AsInt32x16().And(absMask16)
		above += bits.OnesCount16(b.Greater(vhi).ToBits())
		in := b.Greater(vlo).And(b.LessEqual(vhi))
		b.Compress(in).StoreSlice(c[n:])
		n += bits.OnesCount16(in.ToBits())
	}
	a, m := absBandGo(t[16*len(v):], lo, hi, cand[min(n, len(cand)):])
	if m < 0 || n+m > limit {
		return 0, -1
	}
	return above + a, n + m
}

// group16 is group (kernels_simd.go) for 16 lanes.
type group16 struct {
	t  [4][][16]float32
	th [4]archsimd.Int32x16
	w  [4]archsimd.Float32x16
}

func setGroups16(gs []group16, ts [][]float32, thr []uint32, w []float32, lo, hi int) {
	for i := range 4 * len(gs) {
		g := &gs[i/4]
		if i < len(ts) {
			g.t[i%4] = vecs16(ts[i][lo:hi])
			g.th[i%4] = archsimd.BroadcastInt32x16(int32(thr[i] - 1))
			g.w[i%4] = archsimd.BroadcastFloat32x16(w[i])
		} else {
			g.t[i%4] = vecs16(ts[0][lo:hi])
			g.th[i%4] = archsimd.BroadcastInt32x16(math.MaxInt32) // keeps nothing
			g.w[i%4] = archsimd.BroadcastFloat32x16(0)
		}
	}
}

func pruned16(p *[16]float32, th, absMask16 archsimd.Int32x16) archsimd.Float32x16 {
	v := archsimd.LoadFloat32x16(p)
	return v.Masked(v.AsInt32x16().And(absMask16).Greater(th))
}

func tiesInto512(out []float32, ts [][]float32, thr []uint32, w []float32, frequency bool) {
	n16 := len(out) &^ 15
	zero := archsimd.BroadcastFloat32x16(0)
	one := archsimd.BroadcastFloat32x16(1)
	absMask16, signBit16 := archsimd.BroadcastInt32x16(math.MaxInt32), archsimd.BroadcastInt32x16(math.MinInt32)
	gs := make([]group16, (len(ts)+3)/4)
	scratch := make([][16]float32, 4*len(gs)*kernelBlock/16)
	var votesBuf, sumBuf, countBuf [kernelBlock / 16][16]float32
	for lo := 0; lo < n16; lo += kernelBlock {
		hi := min(lo+kernelBlock, n16)
		setGroups16(gs, ts, thr, w, lo, hi)
		votes, sum, count := votesBuf[:(hi-lo)/16], sumBuf[:(hi-lo)/16], countBuf[:(hi-lo)/16]
		nv := len(votes)
		clear(votes)
		for gi := range gs {
			g := &gs[gi]
			a, b, c, d := g.t[0][:nv], g.t[1][:nv], g.t[2][:nv], g.t[3][:nv]
			pa, pb, pc, pd := scratch[(4*gi)*nv:][:nv], scratch[(4*gi+1)*nv:][:nv], scratch[(4*gi+2)*nv:][:nv], scratch[(4*gi+3)*nv:][:nv]
			for j := range votes {
				va, vb, vc, vd := pruned16(&a[j], g.th[0], absMask16), pruned16(&b[j], g.th[1], absMask16), pruned16(&c[j], g.th[2], absMask16), pruned16(&d[j], g.th[3], absMask16)
				va.Store(&pa[j])
				vb.Store(&pb[j])
				vc.Store(&pc[j])
				vd.Store(&pd[j])
				acc := archsimd.LoadFloat32x16(&votes[j])
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
				e := signBit16.Masked(archsimd.LoadFloat32x16(&votes[j]).Less(zero))
				s, n := archsimd.LoadFloat32x16(&sum[j]), archsimd.LoadFloat32x16(&count[j])
				s, n = agreeing16(s, n, archsimd.LoadFloat32x16(&pa[j]), g.w[0], e, one)
				s, n = agreeing16(s, n, archsimd.LoadFloat32x16(&pb[j]), g.w[1], e, one)
				s, n = agreeing16(s, n, archsimd.LoadFloat32x16(&pc[j]), g.w[2], e, one)
				s, n = agreeing16(s, n, archsimd.LoadFloat32x16(&pd[j]), g.w[3], e, one)
				s.Store(&sum[j])
				n.Store(&count[j])
			}
		}
		o := vecs16(out[lo:hi])[:nv]
		for j := range o {
			archsimd.LoadFloat32x16(&sum[j]).Div(archsimd.LoadFloat32x16(&count[j]).Max(one)).Store(&o[j])
		}
	}
	if n16 < len(out) {
		tiesIntoGo(out[n16:], tails(ts, n16), thr, w, frequency)
	}
}

// agreeing16 is agreeing (kernels_simd.go) for 16 lanes.
func agreeing16(sum, count, v, w archsimd.Float32x16, elected archsimd.Int32x16, one archsimd.Float32x16) (archsimd.Float32x16, archsimd.Float32x16) {
	a := one.Masked(v.AsInt32x16().Xor(elected).Greater(archsimd.BroadcastInt32x16(0)))
	return sum.Add(v.Mul(w).Mul(a)), count.Add(a)
}

func prunedSumInto512(out []float32, ts [][]float32, thr []uint32, w []float32) {
	n16 := len(out) &^ 15
	var sumBuf [kernelBlock]float32
	absMask16 := archsimd.BroadcastInt32x16(math.MaxInt32)
	gs := make([]group16, (len(ts)+3)/4)
	for lo := 0; lo < n16; lo += kernelBlock {
		hi := min(lo+kernelBlock, n16)
		sum := vecs16(sumBuf[:hi-lo])
		clear(sum)
		setGroups16(gs, ts, thr, w, lo, hi)
		for _, g := range gs {
			a, b, c, d := g.t[0][:len(sum)], g.t[1][:len(sum)], g.t[2][:len(sum)], g.t[3][:len(sum)]
			for j := range sum {
				s := archsimd.LoadFloat32x16(&sum[j])
				s = s.Add(pruned16(&a[j], g.th[0], absMask16).Mul(g.w[0]))
				s = s.Add(pruned16(&b[j], g.th[1], absMask16).Mul(g.w[1]))
				s = s.Add(pruned16(&c[j], g.th[2], absMask16).Mul(g.w[2]))
				s = s.Add(pruned16(&d[j], g.th[3], absMask16).Mul(g.w[3]))
				s.Store(&sum[j])
			}
		}
		copy(out[lo:hi], sumBuf[:hi-lo])
	}
	if n16 < len(out) {
		prunedSumIntoGo(out[n16:], tails(ts, n16), thr, w)
	}
}

func halfVecs16(x []uint16) [][16]uint16 {
	if len(x) < 16 {
		return nil // no whole vector (and no pointer to one past the data)
	}
	return unsafe.Slice((*[16]uint16)(unsafe.Pointer(unsafe.SliceData(x))), len(x)/16)
}

func uvecs16(x []float32) [][16]uint32 {
	if len(x) < 16 {
		return nil // no whole vector (and no pointer to one past the data)
	}
	return unsafe.Slice((*[16]uint32)(unsafe.Pointer(unsafe.SliceData(x))), len(x)/16)
}

func decodeHalf512(out []float32, raw []uint16, bf16 bool) {
	raw = raw[:len(out)]
	h, o := halfVecs16(raw), uvecs16(out)[:len(raw)/16]
	magnitude, signBit := archsimd.BroadcastUint32x16(0x7fff), archsimd.BroadcastUint32x16(0x8000)
	infNaN, mant := archsimd.BroadcastUint32x16(0x7c00), archsimd.BroadcastUint32x16(0x3ff)
	expMax := archsimd.BroadcastUint32x16(0x7f800000)
	scale := archsimd.BroadcastFloat32x16(0x1p112)
	for i := range o {
		w := archsimd.LoadUint16x16(&h[i]).ExtendToUint32()
		if bf16 {
			w.ShiftAllLeft(16).Store(&o[i])
			continue
		}
		// finite halves: the bits moved into float32's places are the value times 2^-112, subnormals included
		a := w.And(magnitude)
		f := a.ShiftAllLeft(13).AsFloat32x16().Mul(scale).AsUint32x16()
		special := expMax.Or(a.And(mant).ShiftAllLeft(13)) // Inf and NaN (payload kept)
		f = special.Merge(f, a.GreaterEqual(infNaN))
		f.Or(w.And(signBit).ShiftAllLeft(16)).Store(&o[i])
	}
	if n := 16 * len(o); n < len(out) {
		decodeHalfGo(out[n:], raw[n:], bf16)
	}
}

func encodeHalf512(out []uint16, x []float32, bf16 bool) {
	out = out[:len(x)]
	v, o := uvecs16(x), halfVecs16(out)[:len(x)/16]
	abs := archsimd.BroadcastUint32x16(0x7fffffff)
	expMax := archsimd.BroadcastUint32x16(0x7f800000)
	one := archsimd.BroadcastUint32x16(1)
	if bf16 {
		round, quiet := archsimd.BroadcastUint32x16(0x7fff), archsimd.BroadcastUint32x16(0x40)
		for i := range o {
			b := archsimd.LoadUint32x16(&v[i])
			r := b.Add(round).Add(b.ShiftAllRight(16).And(one)).ShiftAllRight(16)
			nan := b.ShiftAllRight(16).Or(quiet)
			nan.Merge(r, b.And(abs).Greater(expMax)).TruncateToUint16().Store(&o[i])
		}
	} else {
		half := archsimd.BroadcastUint32x16(126 << 23)
		bias, round := archsimd.BroadcastUint32x16(112<<23), archsimd.BroadcastUint32x16(0xfff)
		minNormal, overflow := archsimd.BroadcastUint32x16(113<<23), archsimd.BroadcastUint32x16(143<<23)
		signBit := archsimd.BroadcastUint32x16(0x8000)
		inf, qnan := archsimd.BroadcastUint32x16(0x7c00), archsimd.BroadcastUint32x16(0x7e00)
		for i := range o {
			b := archsimd.LoadUint32x16(&v[i])
			a := b.And(abs)
			// as Float32ToHalf: subnormal halves rounded by a float add of 0.5, normal ones by integer rounding
			sub := a.AsFloat32x16().Add(half.AsFloat32x16()).AsUint32x16().Sub(half)
			norm := a.Sub(bias).Add(round).Add(a.ShiftAllRight(13).And(one)).ShiftAllRight(13)
			r := sub.Merge(norm, a.Less(minNormal))
			big := qnan.Merge(inf, a.Greater(expMax))
			r = big.Merge(r, a.GreaterEqual(overflow))
			r.Or(b.ShiftAllRight(16).And(signBit)).TruncateToUint16().Store(&o[i])
		}
	}
	if n := 16 * len(o); n < len(x) {
		encodeHalfGo(out[n:], x[n:], bf16)
	}
}
