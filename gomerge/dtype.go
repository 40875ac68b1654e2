package gomerge

import (
	"math"
	"strings"
	"sync"
	"unsafe"
)

// DType is a floating-point storage type of adapter tensors.
type DType string

// The storage types gomerge reads and writes, named as in safetensors.
const (
	F32  DType = "F32"
	BF16 DType = "BF16"
	F16  DType = "F16"
)

// ParseDType accepts safetensors names (F32, BF16, F16) and torch names
// (float32, bfloat16, float16, half).
func ParseDType(s string) (DType, error) {
	switch strings.ToLower(strings.TrimPrefix(s, "torch.")) {
	case "f32", "float32", "float":
		return F32, nil
	case "bf16", "bfloat16":
		return BF16, nil
	case "f16", "float16", "half":
		return F16, nil
	}
	return "", valueErr("dtype: unsupported dtype %q (expected float32, bfloat16 or float16)", s)
}

// Size is the number of bytes of one element.
func (d DType) Size() int {
	if d == F32 {
		return 4
	}
	return 2
}

// TorchName is the dtype's name in torch (without the "torch." prefix).
func (d DType) TorchName() string {
	switch d {
	case BF16:
		return "bfloat16"
	case F16:
		return "float16"
	}
	return "float32"
}

// Decode converts little-endian raw bytes of dtype d into float32 values.
func Decode(d DType, raw []byte) []float32 {
	out := make([]float32, len(raw)/d.Size())
	decodeInto(out, d, raw)
	return out
}

// decodeInto converts raw bytes of dtype d into out (of the right length).
func decodeInto(out []float32, d DType, raw []byte) {
	n := len(out)
	switch d {
	case F32:
		copy(out, bytesAsFloat32(raw[:4*n]))
	case BF16, F16:
		decodeHalf(out, bytesAsUint16(raw[:2*n]), d == BF16)
	}
}

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

// bytesAsUint16 views little-endian bytes as uint16 values (copying when
// the buffer is not 2-byte aligned).
func bytesAsUint16(b []byte) []uint16 {
	if len(b) < 2 {
		return nil
	}
	if uintptr(unsafe.Pointer(&b[0]))%2 != 0 {
		b = append([]byte(nil), b...)
	}
	return unsafe.Slice((*uint16)(unsafe.Pointer(&b[0])), len(b)/2)
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
			halfLUT[h] = halfToFloat32(uint16(h))
		}
	})
	return halfLUT
}

// Encode converts float32 values to little-endian raw bytes of dtype d,
// rounding to nearest, ties to even, as torch does.
func Encode(d DType, x []float32) []byte {
	out := make([]byte, len(x)*d.Size())
	switch d {
	case F32:
		copy(out, float32AsBytes(x))
	case BF16, F16:
		encodeHalf(bytesAsUint16(out), x, d == BF16)
	}
	return out
}

// Round returns x rounded to the precision of dtype d (identity for F32).
func Round(d DType, x float32) float32 {
	switch d {
	case BF16:
		return math.Float32frombits(uint32(Float32ToBF16(x)) << 16)
	case F16:
		return halfToFloat32(Float32ToHalf(x))
	}
	return x
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

func halfToFloat32(h uint16) float32 {
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

// bytesAsFloat32 views little-endian bytes as float32 values (copying when
// the buffer is not 4-byte aligned). The machine must be little-endian,
// which every platform gomerge is built for is.
func bytesAsFloat32(b []byte) []float32 {
	if len(b) == 0 {
		return nil
	}
	if uintptr(unsafe.Pointer(&b[0]))%4 != 0 {
		c := make([]byte, len(b))
		copy(c, b)
		b = c
	}
	return unsafe.Slice((*float32)(unsafe.Pointer(&b[0])), len(b)/4)
}

func float32AsBytes(x []float32) []byte {
	if len(x) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*len(x))
}

// float32AsUint32 views float32 scratch memory as uint32 values.
func float32AsUint32(x []float32) []uint32 {
	return unsafe.Slice((*uint32)(unsafe.Pointer(unsafe.SliceData(x))), len(x))
}
