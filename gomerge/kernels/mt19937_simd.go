//go:build goexperiment.simd && amd64

package kernels

import (
	"encoding/binary"
	"simd/archsimd"
)

// The Mersenne Twister at 8 lanes (AVX2) and 16 (AVX-512). The twist
// regenerates a vector of consecutive words at once where every word it
// reads is still old (i+1 on, and i+397 below 624) or already regenerated
// (i+397-624, for i >= 227): lanes are loaded before the vector is stored,
// and the ranges' remainders run as the portable version does. Each lane
// does the portable operations, so the bits are the same.

func mtTwistAVX2(s *[MTWords]uint32) {
	upper, lower := archsimd.BroadcastUint32x8(mtUpper), archsimd.BroadcastUint32x8(mtLower)
	matrix := archsimd.BroadcastUint32x8(mtMatrixA)
	mix := func(i, k int) {
		y := archsimd.LoadUint32x8((*[8]uint32)(s[i:])).And(upper).
			Or(archsimd.LoadUint32x8((*[8]uint32)(s[i+1:])).And(lower))
		odd := y.ShiftAllLeft(31).AsInt32x8().ShiftAllRight(31).AsUint32x8() // -(y & 1)
		archsimd.LoadUint32x8((*[8]uint32)(s[k:])).Xor(y.ShiftAllRight(1)).Xor(odd.And(matrix)).
			Store((*[8]uint32)(s[i:]))
	}
	i := 0
	for ; i+8 <= MTWords-mtShift; i += 8 {
		mix(i, i+mtShift)
	}
	for ; i < MTWords-mtShift; i++ {
		mtMix(s, i, i+1, i+mtShift)
	}
	for ; i+8 <= MTWords-1; i += 8 {
		mix(i, i+mtShift-MTWords)
	}
	for ; i < MTWords-1; i++ {
		mtMix(s, i, i+1, i+mtShift-MTWords)
	}
	mtMix(s, MTWords-1, 0, mtShift-1)
}

func mtTwist512(s *[MTWords]uint32) {
	upper, lower := archsimd.BroadcastUint32x16(mtUpper), archsimd.BroadcastUint32x16(mtLower)
	matrix := archsimd.BroadcastUint32x16(mtMatrixA)
	mix := func(i, k int) {
		y := archsimd.LoadUint32x16((*[16]uint32)(s[i:])).And(upper).
			Or(archsimd.LoadUint32x16((*[16]uint32)(s[i+1:])).And(lower))
		odd := y.ShiftAllLeft(31).AsInt32x16().ShiftAllRight(31).AsUint32x16() // -(y & 1)
		archsimd.LoadUint32x16((*[16]uint32)(s[k:])).Xor(y.ShiftAllRight(1)).Xor(odd.And(matrix)).
			Store((*[16]uint32)(s[i:]))
	}
	i := 0
	for ; i+16 <= MTWords-mtShift; i += 16 {
		mix(i, i+mtShift)
	}
	for ; i < MTWords-mtShift; i++ {
		mtMix(s, i, i+1, i+mtShift)
	}
	for ; i+16 <= MTWords-1; i += 16 {
		mix(i, i+mtShift-MTWords)
	}
	for ; i < MTWords-1; i++ {
		mtMix(s, i, i+1, i+mtShift-MTWords)
	}
	mtMix(s, MTWords-1, 0, mtShift-1)
}

// temperBernoulliAVX2 tempers and tests 8 words at once; the comparison's
// bit mask becomes 8 bytes of 0 or 1 through maskBytes.
func temperBernoulliAVX2(dst []byte, words []uint32, t uint32) {
	_ = dst[:len(words)]
	b, c := archsimd.BroadcastUint32x8(mtTemperB), archsimd.BroadcastUint32x8(mtTemperC)
	low := archsimd.BroadcastUint32x8(mtLow24)
	tv := archsimd.BroadcastInt32x8(int32(t)) // t <= 2**24: x < t as signed lanes
	n := len(words) &^ 7
	for i := 0; i < n; i += 8 {
		y := archsimd.LoadUint32x8((*[8]uint32)(words[i:]))
		y = y.Xor(y.ShiftAllRight(mtTemperU))
		y = y.Xor(y.ShiftAllLeft(mtTemperS).And(b))
		y = y.Xor(y.ShiftAllLeft(mtTemperT).And(c))
		y = y.Xor(y.ShiftAllRight(mtTemperL)).And(low)
		binary.LittleEndian.PutUint64(dst[i:], maskBytes[tv.Greater(y.AsInt32x8()).ToBits()])
	}
	temperBernoulliGo(dst[n:], words[n:], t)
}

// temperBernoulli512 tempers and tests 16 words at once; the lanes' 0 or 1
// (the sign of x - t, as in the portable version) are narrowed to bytes.
func temperBernoulli512(dst []byte, words []uint32, t uint32) {
	_ = dst[:len(words)]
	b, c := archsimd.BroadcastUint32x16(mtTemperB), archsimd.BroadcastUint32x16(mtTemperC)
	low := archsimd.BroadcastUint32x16(mtLow24)
	tv := archsimd.BroadcastUint32x16(t)
	n := len(words) &^ 15
	for i := 0; i < n; i += 16 {
		y := archsimd.LoadUint32x16((*[16]uint32)(words[i:]))
		y = y.Xor(y.ShiftAllRight(mtTemperU))
		y = y.Xor(y.ShiftAllLeft(mtTemperS).And(b))
		y = y.Xor(y.ShiftAllLeft(mtTemperT).And(c))
		y = y.Xor(y.ShiftAllRight(mtTemperL)).And(low)
		y.Sub(tv).ShiftAllRight(31).AsInt32x16().TruncateToInt8().AsUint8x16().Store((*[16]uint8)(dst[i:]))
	}
	temperBernoulliGo(dst[n:], words[n:], t)
}

// maskBytes[m] holds, in its little-endian bytes, the bits of the 8-bit
// mask m (byte j is 1 when bit j is set): plain integers, no vectors.
var maskBytes = func() (t [256]uint64) {
	for m := range t {
		for j := range 8 {
			t[m] |= uint64(m>>j&1) << (8 * j)
		}
	}
	return t
}()
