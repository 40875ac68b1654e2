package quant

import "math"

// FP4Values are the E2M1 values of the 16 codes (sign in bit 3), as
// transformers' FP4_VALUES (code 8 is -0).
var FP4Values = [16]float32{0, 0.5, 1, 1.5, 2, 3, 4, 6, 0, -0.5, -1, -1.5, -2, -3, -4, -6}

func init() { FP4Values[8] = float32(math.Copysign(0, -1)) }

// MXFP4Dequantize decodes rows of MXFP4: blocks holds rows x groups x 16
// bytes (32 values per group, element 2i in the LOW nibble of byte i) and
// scales rows x groups E8M0 exponents; value = FP4Values[nibble] *
// 2^(scale - 127). dst is rows x (32 groups), in the stored order (before
// transformers' transpose to [E, K, N]).
func MXFP4Dequantize(dst []float32, blocks, scales []byte) {
	for g, s := range scales {
		f := float32(math.Ldexp(1, int(s)-127))
		blk, out := blocks[g*16:(g+1)*16], dst[g*32:(g+1)*32]
		for i, b := range blk {
			out[2*i] = FP4Values[b&0xf] * f
			out[2*i+1] = FP4Values[b>>4] * f
		}
	}
}

// MXFP4Quantize encodes groups of 32 values as MXFP4 by the OCP MX rule:
// the group's shared exponent is floor(log2(amax)) - 2 (E2M1's largest
// exponent), clamped to E8M0's range, and each value / 2^exponent is
// rounded to the nearest E2M1 value, ties to even, saturating at +-6. An
// all-zero group gets exponent 0 (scale byte 0).
func MXFP4Quantize(blocks, scales []byte, w []float32) {
	for g := range scales {
		grp := w[g*32 : (g+1)*32]
		am := 0.0
		for _, v := range grp {
			am = math.Max(am, math.Abs(float64(v)))
		}
		e := -127
		if am > 0 {
			_, ex := math.Frexp(am) // am = f 2^ex, f in [0.5, 1)
			e = ex - 1 - 2
		}
		e = min(max(e, -127), 127)
		scales[g] = byte(e + 127)
		for i := 0; i < 16; i++ {
			lo := fp4Code(math.Ldexp(float64(grp[2*i]), -e))
			hi := fp4Code(math.Ldexp(float64(grp[2*i+1]), -e))
			blocks[g*16+i] = lo | hi<<4
		}
	}
}

// fp4Code rounds x to the nearest E2M1 code, ties to the even mantissa,
// saturating at 6.
func fp4Code(x float64) byte {
	var sign byte
	if x < 0 || (x == 0 && math.Signbit(x)) {
		sign, x = 8, -x
	}
	// magnitudes 0, 0.5, 1, 1.5, 2, 3, 4, 6 (codes 0..7); the midpoints and the code a tie goes to (even mantissa)
	mids := [7]float64{0.25, 0.75, 1.25, 1.75, 2.5, 3.5, 5}
	k := 0
	for k < 7 && x > mids[k] {
		k++
	}
	if k < 7 && x == mids[k] && k%2 == 1 {
		k++ // a tie goes to the code with an even mantissa (its low bit clear)
	}
	return sign | byte(k)
}
