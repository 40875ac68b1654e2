package kernels

import (
	"math"
	"sync"
)

// The portable half-precision conversions: DecodeHalf and EncodeHalf run
// them unless a vector set has its own, and package gomerge rounds single
// values with them.

// decodeHalfGo converts BF16 (bf16) or F16 bit patterns to float32.
func decodeHalfGo(out []float32, raw []uint16, bf16 bool) {
	raw = raw[:len(out)]
	if bf16 {
		for i, h := range raw {
			out[i] = math.Float32frombits(uint32(h) << 16)
		}
		return
	}
	lut := halfTable()
	for i, h := range raw {
		out[i] = lut[h]
	}
}

// encodeHalfGo rounds float32 values to BF16 (bf16) or F16 bit patterns.
func encodeHalfGo(out []uint16, x []float32, bf16 bool) {
	out = out[:len(x)]
	if bf16 {
		for i, v := range x {
			out[i] = Float32ToBF16(v)
		}
		return
	}
	for i, v := range x {
		out[i] = Float32ToHalf(v)
	}
}

var (
	halfOnce sync.Once
	halfLUT  *[1 << 16]float32
)

// halfTable maps every binary16 bit pattern to its float32 value (256 KiB,
// built once): one load per element instead of the bit manipulation.
func halfTable() *[1 << 16]float32 {
	halfOnce.Do(func() {
		halfLUT = new([1 << 16]float32)
		for h := range halfLUT {
			halfLUT[h] = HalfToFloat32(uint16(h))
		}
	})
	return halfLUT
}

// Float32ToBF16 rounds f to bfloat16 bits (round to nearest even; NaN stays NaN).
func Float32ToBF16(f float32) uint16 {
	b := math.Float32bits(f)
	if b&0x7fffffff > 0x7f800000 { // NaN: keep it quiet and NaN
		return uint16(b>>16) | 0x40
	}
	b += 0x7fff + (b>>16)&1
	return uint16(b >> 16)
}

// Float32ToHalf rounds f to IEEE 754 binary16 bits (round to nearest even).
// Zeros, subnormal and normal halves take no branch (merged factors mix
// zeros and normal values at random, which would defeat the branch
// predictor): subnormal halves are rounded by the FPU, adding 0.5 so that
// the float32's last place is the half's least subnormal; normal halves by
// integer rounding of the 13 dropped bits.
func Float32ToHalf(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	a := b & 0x7fffffff
	if a >= 143<<23 { // >= 2^16: Inf, or NaN (kept quiet), or a finite value that overflows to Inf
		if a > 0x7f800000 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	}
	const half = 126 << 23 // 0.5
	sub := math.Float32bits(math.Float32frombits(a)+math.Float32frombits(half)) - half
	// above half, or half with the kept last bit odd, carries into the kept bits (up to Inf: correct)
	norm := (a - 112<<23 + 0xfff + (a>>13)&1) >> 13
	isSub := (a - 113<<23) >> 31 // 1 below 2^-14, where the half is subnormal
	return sign | uint16(norm^(norm^sub)&-isSub)
}

// HalfToFloat32 returns the float32 value of IEEE 754 binary16 bits h
// (exact: every half is a float32).
func HalfToFloat32(h uint16) float32 {
	sign := uint32(h&0x8000) << 16
	exp := uint32(h>>10) & 0x1f
	mant := uint32(h & 0x3ff)
	switch {
	case exp == 0x1f:
		return math.Float32frombits(sign | 0x7f800000 | mant<<13)
	case exp != 0:
		return math.Float32frombits(sign | (exp+112)<<23 | mant<<13)
	case mant == 0:
		return math.Float32frombits(sign)
	}
	// subnormal: normalise
	e := uint32(113)
	for mant&0x400 == 0 {
		mant <<= 1
		e--
	}
	return math.Float32frombits(sign | e<<23 | (mant&0x3ff)<<13)
}
