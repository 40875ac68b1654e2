//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"math/bits"
	"simd/archsimd"
	"unsafe"
)

// The AVX-512 kernels (16 float32 lanes) that are AVX-512's own: the band's
// candidates are packed by the vector compress instruction, which AVX2
// lacks, and the BF16 / F16 conversions, which the AVX2 set leaves to the
// portable ones (encoding narrows 32-bit lanes to 16 bits with VPMOVDW, an
// AVX-512 instruction).
// The kernels that are the same code as AVX2's at twice the lanes are
// generated from kernels_avx2.go into kernels_avx512_gen.go.

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
