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
	if x != x {
		return 0x7f
	}
	var sign uint8
	a := float64(x)
	if a < 0 || (a == 0 && math.Signbit(a)) {
		sign, a = 0x80, -a
	}
	if a >= E4M3Max {
		return sign | 0x7e
	}
	if a < math.Ldexp(1, -6) { // subnormal: multiples of 2^-9
		q := math.RoundToEven(a * 512)
		return sign | uint8(q) // q = 8 is the smallest normal (0x08)
	}
	frac, exp := math.Frexp(a) // a = frac * 2^exp, frac in [0.5, 1)
	e := exp - 1               // a = (2 frac) 2^e
	m := math.RoundToEven((2*frac - 1) * 8)
	if m == 8 {
		m, e = 0, e+1
	}
	if e+7 > 15 || (e+7 == 15 && m == 7) {
		return sign | 0x7e
	}
	return sign | uint8(e+7)<<3 | uint8(m)
}
