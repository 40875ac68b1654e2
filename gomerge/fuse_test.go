package gomerge

import (
	"encoding/binary"
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/safetensors"
)

// addLowRank adds s B A in the base tensor's layout: out x in normally,
// (B A)^T (in x out) for fan_in_fan_out and embeddings.
func TestAddLowRankLayouts(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	randn := func(n int) []float32 {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		return x
	}
	cases := []struct {
		name            string
		out, in, r      int
		transposed      bool
		s               float32
		rowsOfW, colsOf int
	}{
		{"linear", 7, 5, 3, false, 0.5, 7, 5},
		{"fan_in_fan_out", 7, 5, 3, true, 2, 5, 7},
		{"rank 1", 4, 9, 1, false, -1, 4, 9},
		{"embedding", 6, 11, 2, true, 1.5, 11, 6},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			a, b := randn(c.r*c.in), randn(c.out*c.r)
			w := randn(c.rowsOfW * c.colsOf)
			want := make([]float64, len(w))
			for i := 0; i < c.out; i++ {
				for j := 0; j < c.in; j++ {
					d := 0.0
					for k := 0; k < c.r; k++ {
						d += float64(b[i*c.r+k]) * float64(a[k*c.in+j])
					}
					idx := i*c.in + j
					if c.transposed {
						idx = j*c.out + i
					}
					want[idx] = float64(w[idx]) + float64(c.s)*d
				}
			}
			addLowRank(w, a, b, c.rowsOfW, c.colsOf, c.r, c.s, c.transposed)
			for i := range w {
				assert.Equal(t, float32(want[i]), w[i], "element %d", i)
			}
		})
	}
}

// The output is rounded once, to nearest with ties to even, as torch does.
func TestBF16RoundingToNearestEven(t *testing.T) {
	bits := func(b uint32) float32 { return math.Float32frombits(b) }
	cases := []struct {
		name string
		in   float32
		want uint16
	}{
		{"exact", 1, 0x3f80},
		{"below half rounds down", bits(0x3f807fff), 0x3f80},
		{"tie to even (down)", bits(0x3f808000), 0x3f80},
		{"tie to even (up)", bits(0x3f818000), 0x3f82},
		{"above half rounds up", bits(0x3f808001), 0x3f81},
		{"negative tie", bits(0xbf818000), 0xbf82},
		{"overflow to inf", bits(0x7f7fffff), 0x7f80},
		{"nan stays nan", float32(math.NaN()), 0x7fc0},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			got := binary.LittleEndian.Uint16(encodeOutput(BF16, []float32{c.in}))
			if c.name == "nan stays nan" {
				assert.Equal(t, uint16(0x7f80), got&0x7f80)
				assert.NotZero(t, got&0x7f)
				return
			}
			assert.Equal(t, c.want, got)
		})
	}
	x := []float32{1.5, -2.25}
	assert.Equal(t, safetensors.Float32AsBytes(x), encodeOutput(F32, x), "float32 is written as it is")
}

// DoRA rescales each output (a row, or a column when transposed) to its
// magnitude.
func TestScaleByNorm(t *testing.T) {
	for _, transposed := range []bool{false, true} {
		w := []float32{3, 4, 0, 5, 12, 0} // 2 x 3
		mag := []float32{10, 26}
		n := 2
		if transposed {
			w = []float32{3, 5, 4, 12, 0, 0} // 3 x 2: the outputs are the columns
		}
		scaleByNorm(w, append([]float32(nil), w...), mag[:n], map[bool]int{false: 2, true: 3}[transposed],
			map[bool]int{false: 3, true: 2}[transposed], transposed)
		want := []float32{6, 8, 0, 10, 24, 0}
		if transposed {
			want = []float32{6, 10, 8, 24, 0, 0}
		}
		require.InDeltaSlice(t, want, w, 1e-5, "transposed=%v", transposed)
	}
}
