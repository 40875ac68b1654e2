package fuse

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/quant"
)

// TestMXFP4Layout checks that an MXFP4 weight is dequantized to
// [E, in, out] (the stored [E, out, in] transposed, as transformers'
// convert_moe_packed_tensors) and that requantizing that layout gives the
// stored bytes back.
func TestMXFP4Layout(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	cases := []struct{ experts, rows, cols int }{{1, 3, 32}, {2, 5, 64}, {3, 1, 96}}
	for _, c := range cases {
		g := c.cols / 32
		w := make([]float32, c.experts*c.rows*c.cols)
		for i := range w {
			w[i] = float32(rng.NormFloat64())
		}
		blocks, scales := make([]byte, len(w)/2), make([]byte, len(w)/32)
		quant.MXFP4Quantize(blocks, scales, w)
		stored := make([]float32, len(w))
		quant.MXFP4Dequantize(stored, blocks, scales)
		qt := &quantTensor{format: qMXFP4, shape: []int{c.experts, g * 32, c.rows}}
		dense := make([]float32, len(w))
		qt.mxfp4Dequantize(dense, blocks, scales, 0)
		for e := range c.experts {
			for o := range c.rows {
				for i := range c.cols {
					require.Equal(t, stored[(e*c.rows+o)*c.cols+i], dense[(e*c.cols+i)*c.rows+o])
				}
			}
		}
		one := make([]float32, c.rows*c.cols) // the last expert alone, by its offset
		qt.mxfp4Dequantize(one, blocks, scales, (c.experts-1)*c.rows*c.cols)
		assert.Equal(t, dense[(c.experts-1)*c.rows*c.cols:], one)
		b2, s2 := qt.mxfp4Quantize(dense)
		assert.Equal(t, blocks, b2)
		assert.Equal(t, scales, s2)
	}
}
