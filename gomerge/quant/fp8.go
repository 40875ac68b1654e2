package quant

import (
	"math"
)

// E4M3Max is the largest finite float8_e4m3fn value.
const E4M3Max = 448

// e4m3Table and e5m2Table decode every byte.
var e4m3Table, e5m2Table [256]float32

func init() {
	for b := 0; b < 256; b++ {
		e4m3Table[b] = decodeE4M3(uint8(b))
		e5m2Table[b] = decodeE5M2(uint8(b))
	}
}

func decodeE4M3(b uint8) float32 {
	sign := float32(1)
	if b&0x80 != 0 {
		sign = -1
	}
	e, m := int(b>>3&0xf), float64(b&7)
	if e == 15 && m == 7 {
		return float32(math.NaN())
	}
	if e == 0 {
		return sign * float32(math.Ldexp(m/8, -6))
	}
	return sign * float32(math.Ldexp(1+m/8, e-7))
}

func decodeE5M2(b uint8) float32 {
	sign := 1.0
	if b&0x80 != 0 {
		sign = -1
	}
	e, m := int(b>>2&0x1f), float64(b&3)
	switch {
	case e == 31 && m == 0:
		return float32(math.Inf(int(sign)))
	case e == 31:
		return float32(math.NaN())
	case e == 0:
		return float32(sign * math.Ldexp(m/4, -14))
	}
	return float32(sign * math.Ldexp(1+m/4, e-15))
}

// E4M3ToFloat32 decodes float8_e4m3fn bytes.
func E4M3ToFloat32(dst []float32, src []byte) {
	for i, b := range src {
		dst[i] = e4m3Table[b]
	}
}

// E5M2ToFloat32 decodes float8_e5m2 bytes.
func E5M2ToFloat32(dst []float32, src []byte) {
	for i, b := range src {
		dst[i] = e5m2Table[b]
	}
}

// Float32ToE4M3 rounds x to float8_e4m3fn, to nearest with ties to even, as
// torch's cast does; values beyond the largest finite value (448) saturate
// to it (the quantizers clamp first, so the cast never sees them), NaN
// gives NaN (0x7f).
func Float32ToE4M3(x float32) uint8 {
	b := math.Float32bits(x)
	sign := uint8(b>>24) & 0x80
	a := b &^ (1 << 31)
	switch {
	case a > 0x7f800000: // NaN
		return sign | 0x7f
	case a >= 0x43e00000: // 448 and above
		return sign | 0x7e
	case a < 0x3c800000: // below 2^-6: subnormal, multiples of 2^-9 (8 of them is the smallest normal, 0x08)
		return sign | uint8(math.RoundToEven(float64(math.Float32frombits(a))*512))
	}
	// normal: keep 3 of the 23 mantissa bits, to nearest with ties to even (a carry moves into the exponent)
	r := (a + 0x7ffff + (a>>20)&1) >> 20
	e := r>>3 - 127 + 7
	if e > 15 || (e == 15 && r&7 == 7) {
		return sign | 0x7e
	}
	return sign | uint8(e)<<3 | uint8(r&7)
}
