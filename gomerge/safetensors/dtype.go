package safetensors

import (
	"math"
	"strings"
	"unsafe"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/kernels"
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
	return "", errs.Value("dtype: unsupported dtype %q (expected float32, bfloat16 or float16)", s)
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

// DecodeInto converts little-endian raw bytes of dtype d into out (of
// len(raw)/d.Size() values at least), without allocating.
func DecodeInto(out []float32, d DType, raw []byte) { decodeInto(out[:len(raw)/d.Size()], d, raw) }

// decodeInto converts raw bytes of dtype d into out (of the right length).
func decodeInto(out []float32, d DType, raw []byte) {
	n := len(out)
	switch d {
	case F32:
		copy(out, BytesAsFloat32(raw[:4*n]))
	case BF16, F16:
		kernels.DecodeHalf(out, bytesAsUint16(raw[:2*n]), d == BF16)
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

// Encode converts float32 values to little-endian raw bytes of dtype d,
// rounding to nearest, ties to even, as torch does.
func Encode(d DType, x []float32) []byte {
	out := make([]byte, len(x)*d.Size())
	switch d {
	case F32:
		copy(out, Float32AsBytes(x))
	case BF16, F16:
		kernels.EncodeHalf(bytesAsUint16(out), x, d == BF16)
	}
	return out
}

// EncodeInto is Encode appending to dst (whose capacity is reused).
func EncodeInto(dst []byte, d DType, x []float32) []byte {
	n := len(x) * d.Size()
	if cap(dst)-len(dst) < n {
		grown := make([]byte, len(dst), len(dst)+n)
		copy(grown, dst)
		dst = grown
	}
	out := dst[len(dst) : len(dst)+n]
	switch {
	case d == F32:
		copy(out, Float32AsBytes(x))
	case n > 0 && uintptr(unsafe.Pointer(&out[0]))%2 != 0: // bytesAsUint16 would convert a copy
		copy(out, Encode(d, x))
	case n > 0:
		kernels.EncodeHalf(bytesAsUint16(out), x, d == BF16)
	}
	return dst[:len(dst)+n]
}

// Round returns x rounded to the precision of dtype d (identity for F32).
func Round(d DType, x float32) float32 {
	switch d {
	case BF16:
		return math.Float32frombits(uint32(kernels.Float32ToBF16(x)) << 16)
	case F16:
		return kernels.HalfToFloat32(kernels.Float32ToHalf(x))
	}
	return x
}

// BytesAsFloat32 views little-endian bytes as float32 values (copying when
// the buffer is not 4-byte aligned). The machine must be little-endian,
// which every platform gomerge is built for is.
func BytesAsFloat32(b []byte) []float32 {
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

// Float32AsBytes views float32 values as their little-endian bytes (no
// copy).
func Float32AsBytes(x []float32) []byte {
	if len(x) == 0 {
		return nil
	}
	return unsafe.Slice((*byte)(unsafe.Pointer(&x[0])), 4*len(x))
}
