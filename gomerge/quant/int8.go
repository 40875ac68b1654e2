package quant

import (
	"math"

	"gomerge/gomerge/parallel"
)

// int8Recip127 is bitsandbytes' 1/127 (7.874015718698502e-3) as float32.
const int8Recip127 = float32(7.874015718698502e-3)

// Int8Dequantize writes W = (int8 * SCB[row]) * (1/127) in float32, the
// two roundings of bitsandbytes' int8_vectorwise_dequant.
func Int8Dequantize(dst []float32, q []byte, scb []float32, rows, cols int) {
	parallel.For(rows, max(1, (1<<16)/max(1, cols)), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			s := scb[r]
			for c := 0; c < cols; c++ {
				dst[r*cols+c] = float32(int8(q[r*cols+c])) * s * int8Recip127
			}
		}
	})
}

// Int8Quantize is bitsandbytes' int8_vectorwise_quant (threshold 0) in
// float32: SCB = max |row|, q = round(w * (127 / SCB)), ties to even. A
// row of zeros gives SCB 0 and q 0 (the reference would divide by 0).
func Int8Quantize(q []byte, scb []float32, w []float32, rows, cols int) {
	parallel.For(rows, max(1, (1<<16)/max(1, cols)), func(lo, hi int) { int8Rows(q, scb, w, cols, lo, hi) })
}

func int8Rows(q []byte, scb []float32, w []float32, cols, lo, hi int) {
	for r := lo; r < hi; r++ {
		row := w[r*cols : (r+1)*cols]
		am := float32(0)
		for _, v := range row {
			am = max32(am, abs32(v))
		}
		scb[r] = am
		f := (1 / am) * 127 // torch's 127.0 / t: reciprocal(t) * 127
		for c, v := range row {
			x := float32(0)
			if am != 0 {
				x = float32(math.RoundToEven(float64(v * f)))
			}
			q[r*cols+c] = byte(int8(x))
		}
	}
}
