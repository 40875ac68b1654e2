package quant

import (
	"fmt"
	"math"

	"gomerge/gomerge/parallel"
)

// FP8Block is a blockwise-scaled FP8 E4M3 weight (DeepSeek-V3, Qwen3 FP8,
// transformers' fine-grained FP8): a rows x cols matrix whose block
// (r / BlockRows, c / BlockCols) is multiplied by ScaleInv at that block.
// Edge blocks may be ragged (shorter than the block size).
type FP8Block struct {
	Rows, Cols           int
	BlockRows, BlockCols int
}

// ScaleShape is the shape of weight_scale_inv: ceil(rows / block_rows) x
// ceil(cols / block_cols).
func (f FP8Block) ScaleShape() []int {
	return []int{ceilDiv(f.Rows, f.BlockRows), ceilDiv(f.Cols, f.BlockCols)}
}

// Check validates the block size and the scale tensor's length.
func (f FP8Block) Check(scales int) error {
	if f.BlockRows <= 0 || f.BlockCols <= 0 {
		return fmt.Errorf("weight_block_size %dx%d is not positive", f.BlockRows, f.BlockCols)
	}
	s := f.ScaleShape()
	if scales != s[0]*s[1] {
		return fmt.Errorf("weight_scale_inv has %d values; a %dx%d weight in %dx%d blocks needs %dx%d", scales, f.Rows, f.Cols, f.BlockRows, f.BlockCols, s[0], s[1])
	}
	return nil
}

// Dequantize writes W[r, c] = f32(q[r, c]) * scaleInv[r / br, c / bc]
// (despite its name, weight_scale_inv multiplies).
func (f FP8Block) Dequantize(dst []float32, q []byte, scaleInv []float32) {
	sc := ceilDiv(f.Cols, f.BlockCols)
	parallel.For(f.Rows, max(1, (1<<16)/max(1, f.Cols)), func(lo, hi int) {
		for r := lo; r < hi; r++ {
			srow := scaleInv[(r/f.BlockRows)*sc:]
			row, out := q[r*f.Cols:(r+1)*f.Cols], dst[r*f.Cols:(r+1)*f.Cols]
			for c, b := range row {
				out[c] = e4m3Table[b] * srow[c/f.BlockCols]
			}
		}
	})
}

// Quantize is transformers' Fp8Quantize rule per block, in float32: scale =
// 448 / amax, which torch computes as reciprocal(amax) * 448 (1 for an
// all-zero block), stored inverse = 1 / scale, q =
// e4m3(clamp(W * scale, -448, 448)). A ragged edge block takes its amax
// over the values it has, as zero-padding to the full block does.
func (f FP8Block) Quantize(q []byte, scaleInv []float32, w []float32) {
	sr, sc := ceilDiv(f.Rows, f.BlockRows), ceilDiv(f.Cols, f.BlockCols)
	parallel.For(sr, 1, func(lo, hi int) { f.quantizeRows(q, scaleInv, w, lo, hi, sc) })
}

// quantizeRows quantizes block rows [lo, hi).
func (f FP8Block) quantizeRows(q []byte, scaleInv []float32, w []float32, lo, hi, sc int) {
	for br := lo; br < hi; br++ {
		r0, r1 := br*f.BlockRows, min((br+1)*f.BlockRows, f.Rows)
		for bc := 0; bc < sc; bc++ {
			c0, c1 := bc*f.BlockCols, min((bc+1)*f.BlockCols, f.Cols)
			amax := float32(0)
			for r := r0; r < r1; r++ {
				for _, v := range w[r*f.Cols+c0 : r*f.Cols+c1] {
					amax = max32(amax, abs32(v))
				}
			}
			scale := float32(1)
			if amax > 0 {
				scale = (1 / amax) * E4M3Max // torch's 448.0 / t: reciprocal(t) * 448
			}
			scaleInv[br*sc+bc] = 1 / scale
			for r := r0; r < r1; r++ {
				for c := c0; c < c1; c++ {
					q[r*f.Cols+c] = Float32ToE4M3(clamp32(w[r*f.Cols+c]*scale, -E4M3Max, E4M3Max))
				}
			}
		}
	}
}

// FP8Scaled is an FP8 E4M3 weight with one scale per tensor or per output
// row (compressed-tensors "float-quantized", fbgemm_fp8): W = f32(q) *
// weight_scale.
type FP8Scaled struct {
	Rows, Cols int
	PerChannel bool // one scale per row ([rows, 1]); else one scale
}

// Dequantize writes W = f32(q) * scale (per row when PerChannel).
func (f FP8Scaled) Dequantize(dst []float32, q []byte, scale []float32) {
	for r := 0; r < f.Rows; r++ {
		s := scale[0]
		if f.PerChannel {
			s = scale[r]
		}
		row, out := q[r*f.Cols:(r+1)*f.Cols], dst[r*f.Cols:(r+1)*f.Cols]
		for c, b := range row {
			out[c] = e4m3Table[b] * s
		}
	}
}

// Quantize is compressed-tensors' rule in float32: scale = amax / 448 (per
// tensor or per row; 1 where amax is 0), rounded to the stored scale's
// dtype by round (nil: float32), then q = e4m3(clamp(W / scale, -448,
// 448)).
func (f FP8Scaled) Quantize(q []byte, scale []float32, w []float32, round func(float32) float32) {
	groups, per := 1, f.Rows*f.Cols
	if f.PerChannel {
		groups, per = f.Rows, f.Cols
	}
	for g := 0; g < groups; g++ {
		seg := w[g*per : (g+1)*per]
		amax := float32(0)
		for _, v := range seg {
			amax = max32(amax, abs32(v))
		}
		s := float32(1)
		if amax > 0 {
			s = amax / E4M3Max
		}
		if round != nil {
			s = round(s)
		}
		scale[g] = s
		for i, v := range seg {
			q[g*per+i] = Float32ToE4M3(clamp32(v/s, -E4M3Max, E4M3Max))
		}
	}
}

func ceilDiv(a, b int) int { return (a + b - 1) / b }

func abs32(x float32) float32 { return math.Float32frombits(math.Float32bits(x) &^ (1 << 31)) }

// max32 is max that propagates NaN (as torch's amax does).
func max32(a, b float32) float32 {
	if a != a || b != b {
		return float32(math.NaN())
	}
	return max(a, b)
}

// clamp32 is torch.clamp: NaN stays NaN.
func clamp32(x, lo, hi float32) float32 {
	if x < lo {
		return lo
	}
	if x > hi {
		return hi
	}
	return x
}
