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

// MXFP4Quantize encodes groups of 32 values as MXFP4 exactly as torchao's
// to_mx (torchao.prototype.mx_formats, the OCP MX v1.0 reference, FLOOR
// scale mode) does, bit for bit:
//   - the group's scale byte is the float32 exponent field of amax (so
//     floor(log2(amax)) for a normal amax, -127 for a subnormal one or 0)
//     minus 2 (E2M1's largest exponent), clamped to [-127, 128], plus 127;
//     a NaN in the group makes it 255, an infinity 253;
//   - each value is divided in float32 by the scale (2^(byte-127), but at
//     least 2^-126, float32's smallest normal, as torchao clamps it; +Inf
//     for byte 255) and rounded to E2M1 ties to even, saturating at +-6, by
//     e2m1Code.
//
// Element 2i of a group goes in the low nibble of byte i.
func MXFP4Quantize(blocks, scales []byte, w []float32) {
	for g := range scales {
		grp := w[g*32 : (g+1)*32]
		var amax float32
		isNaN := false
		for _, v := range grp {
			a := math.Float32frombits(math.Float32bits(v) &^ (1 << 31))
			if a != a {
				isNaN = true
			} else if a > amax {
				amax = a
			}
		}
		e := int(math.Float32bits(amax)>>23) - 127 - 2
		e = min(max(e, -127), 128)
		s := byte(e + 127)
		if isNaN {
			s = 255
		}
		scales[g] = s
		f := math.Float32frombits(uint32(s) << 23)
		if s == 0 {
			f = math.Float32frombits(1 << 23) // torchao clamps the scale to 2^-126
		}
		for i := 0; i < 16; i++ {
			lo := e2m1Code(grp[2*i] / f)
			hi := e2m1Code(grp[2*i+1] / f)
			blocks[g*16+i] = lo | hi<<4
		}
	}
}

// e2m1Code rounds x to the nearest E2M1 code, ties to the even mantissa,
// saturating at 6 (code 7), with torchao's float32 bit arithmetic
// (custom_fp_utils._f32_to_floatx_unpacked), including what it gives a NaN.
func e2m1Code(x float32) byte {
	b := math.Float32bits(x)
	sign := byte(b>>28) & 8
	b &^= 1 << 31
	a := math.Float32frombits(b)
	var code byte
	switch {
	case a >= 6:
		code = 7
	case a < 1: // below E2M1's smallest normal: add 2^21 (ulp 0.5) so the float32 adder rounds to the 0.5 grid
		d := a + float32(1<<22)
		code = byte(math.Float32bits(d) - 149<<23)
	default: // normal (and NaN, whose comparisons are false): rebias and round the mantissa half to even
		n := int32(b)
		odd := (n >> 22) & 1
		n += (1-127)<<23 + (1<<21 - 1) + odd
		code = byte(n >> 22)
	}
	return code | sign
}
