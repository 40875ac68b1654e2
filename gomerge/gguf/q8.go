package gguf

import (
	"encoding/binary"
	"math"

	"gomerge/gomerge/kernels"
)

// Q8_0 stores blocks of 32 values as one float16 scale d and 32 int8
// values q, x = d * q.
const (
	q8Block     = 32
	q8BlockSize = 2 + q8Block
)

// quantizeQ8_0 appends x (a multiple of 32 values) to dst as Q8_0 blocks,
// bit for bit as ggml's quantize_row_q8_0_ref and gguf-py's Q8_0 do:
// d = max|x| / 127 in float32, q = round(x * (1/d)) half away from zero,
// and d stored rounded to float16.
func quantizeQ8_0(dst []byte, x []float32) []byte {
	for b := 0; b+q8Block <= len(x); b += q8Block {
		blk := x[b : b+q8Block]
		var amax float32
		for _, v := range blk {
			amax = max(amax, float32(math.Abs(float64(v))))
		}
		d := amax / 127
		var id float32
		if d != 0 {
			id = 1 / d
		}
		dst = binary.LittleEndian.AppendUint16(dst, kernels.Float32ToHalf(d))
		for _, v := range blk {
			dst = append(dst, byte(int8(math.Round(float64(float32(v*id))))))
		}
	}
	return dst
}
