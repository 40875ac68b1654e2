package quant

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func randn(n int, seed uint64, scale float64) []float32 {
	r := rand.New(rand.NewPCG(seed, 1))
	out := make([]float32, n)
	for i := range out {
		out[i] = float32(r.NormFloat64() * scale)
	}
	return out
}

func TestE4M3RoundTripsEveryByte(t *testing.T) {
	for b := 0; b < 256; b++ {
		v := e4m3Table[b]
		if v != v {
			assert.Equal(t, uint8(0x7f), Float32ToE4M3(v)&0x7f, "NaN byte %#x", b)
			continue
		}
		assert.Equal(t, uint8(b), Float32ToE4M3(v), "byte %#x = %v", b, v)
	}
	assert.Equal(t, float32(448), e4m3Table[0x7e])
	assert.Equal(t, float32(math.Ldexp(1, -9)), e4m3Table[1])
}

func TestE4M3RoundsToNearestEven(t *testing.T) {
	cases := []struct {
		x    float32
		want float32
	}{
		{1 + 1.0/16, 1},                  // midpoint of 1 and 1.125: to even mantissa (1)
		{1 + 3.0/16, 1.25},               // midpoint of 1.125 and 1.25: to 1.25 (even)
		{1 + 1.0/16 + 1e-6, 1.125},       // above the midpoint
		{float32(math.Ldexp(1, -10)), 0}, // half the smallest subnormal: ties to 0
		{float32(math.Ldexp(3, -10)), float32(math.Ldexp(2, -9))},
		{460, 448}, // saturates
		{-1000, -448},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, e4m3Table[Float32ToE4M3(c.x)], "x = %v", c.x)
	}
}

func TestE5M2Decode(t *testing.T) {
	assert.Equal(t, float32(57344), e5m2Table[0x7b])
	assert.True(t, math.IsInf(float64(e5m2Table[0x7c]), 1))
	assert.Equal(t, float32(-1), e5m2Table[0xbc])
}

func TestFP8BlockRequantizesItsOwnValues(t *testing.T) {
	for _, c := range []struct{ rows, cols int }{{256, 256}, {130, 300}, {5, 7}} {
		f := FP8Block{Rows: c.rows, Cols: c.cols, BlockRows: 128, BlockCols: 128}
		s := f.ScaleShape()
		require.NoError(t, f.Check(s[0]*s[1]))
		w := randn(c.rows*c.cols, 3, 0.02)
		q := make([]byte, len(w))
		inv := make([]float32, s[0]*s[1])
		f.Quantize(q, inv, w)
		deq := make([]float32, len(w))
		f.Dequantize(deq, q, inv)
		for i := range w { // within half an e4m3 step (relative 2^-4) of its block's amax-scaled value
			assert.InDelta(t, w[i], deq[i], float64(inv[(i/c.cols/128)*s[1]+(i%c.cols)/128])*16+1e-12)
		}
		q2, inv2 := make([]byte, len(w)), make([]float32, len(inv))
		f.Quantize(q2, inv2, deq)
		assert.Equal(t, q, q2, "%dx%d: requantizing the dequantized weight changes it", c.rows, c.cols)
	}
	assert.Error(t, FP8Block{Rows: 10, Cols: 10, BlockRows: 128, BlockCols: 128}.Check(2))
	assert.Error(t, FP8Block{Rows: 10, Cols: 10}.Check(1))
}

func TestFP8ScaledPerTensorAndChannel(t *testing.T) {
	w := randn(64*48, 4, 0.05)
	for _, per := range []bool{false, true} {
		f := FP8Scaled{Rows: 64, Cols: 48, PerChannel: per}
		n := 1
		if per {
			n = 64
		}
		q, sc := make([]byte, len(w)), make([]float32, n)
		f.Quantize(q, sc, w, nil)
		deq := make([]float32, len(w))
		f.Dequantize(deq, q, sc)
		q2, sc2 := make([]byte, len(w)), make([]float32, n)
		f.Quantize(q2, sc2, deq, nil)
		assert.Equal(t, q, q2)
	}
}

func TestBnb4StateJSON(t *testing.T) {
	off := 0.012345678
	for _, s := range []Bnb4State{
		{QuantType: "nf4", Blocksize: 64, DType: "bfloat16", Shape: []int{64, 100}},
		{QuantType: "fp4", Blocksize: 64, DType: "float16", Shape: []int{3, 5}, NestedBlocksize: 256, NestedDType: "float32", NestedOffset: &off},
	} {
		got, err := ParseBnb4State(s.JSON())
		require.NoError(t, err)
		assert.Equal(t, s, got)
	}
	for _, bad := range []string{`{}`, `{"quant_type":"int4","blocksize":64,"dtype":"float32","shape":[2]}`,
		`{"quant_type":"nf4","blocksize":0,"dtype":"float32","shape":[2]}`, `{"quant_type":"nf4","blocksize":64,"dtype":"int8","shape":[2]}`,
		`{"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[2,-1]}`, `[1]`,
		`{"quant_type":"nf4","blocksize":64,"dtype":"float32","shape":[2],"nested_blocksize":256}`} {
		_, err := ParseBnb4State([]byte(bad))
		assert.Error(t, err, bad)
	}
}

func TestPyFloat(t *testing.T) {
	for x, want := range map[float64]string{1: "1.0", 0.1: "0.1", 1e-5: "1e-05", 2.5e-7: "2.5e-07", 1e16: "1e+16", -0.00012: "-0.00012", 123.5: "123.5"} {
		assert.Equal(t, want, PyFloat(x))
	}
}

// nf4Map is bitsandbytes' NF4 code (get_4bit_type("nf4")), as stored in quant_map.
var nf4Map = []float32{-1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453, -0.28444138169288635,
	-0.18477343022823334, -0.09105003625154495, 0.0, 0.07958029955625534, 0.16093020141124725, 0.24611230194568634,
	0.33791524171829224, 0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0}

func TestBnb4RequantizesItsOwnValues(t *testing.T) {
	dyn := make([]float32, 256) // any sorted code in [-1, 1] serves for the nested absmax here
	for i := range dyn {
		dyn[i] = float32(i-128) / 127
	}
	off := 0.0
	for _, nested := range []bool{false, true} {
		for _, n := range []int{64 * 10, 64*10 + 7, 33} {
			st := Bnb4State{QuantType: "nf4", Blocksize: 64, DType: "float32", Shape: []int{n}}
			if nested {
				st.NestedBlocksize, st.NestedDType, st.NestedOffset = 256, "float32", &off
			}
			b := &Bnb4{State: st, QuantMap: nf4Map, NestedQuantMap: dyn}
			w := randn(n, 7, 0.1)
			packed := make([]byte, st.PackedBytes())
			q := b.Requantize(packed, w)
			require.NoError(t, q.Check(len(packed)))
			deq := make([]float32, n)
			q.Dequantize(deq, packed, nil)
			am := q.BlockAbsmax()
			for i := range w {
				assert.InDelta(t, w[i], deq[i], 0.2*float64(am[i/64])+1e-3, "element %d", i)
			}
			if !nested { // without double quant the block absmax is exact, so the codes come back
				p2 := make([]byte, len(packed))
				b.Requantize(p2, deq)
				assert.Equal(t, packed, p2, "n=%d", n)
			}
		}
	}
}

func TestBnb4CheckNamesTheMismatch(t *testing.T) {
	st := Bnb4State{QuantType: "nf4", Blocksize: 64, DType: "float32", Shape: []int{128}}
	b := &Bnb4{State: st, QuantMap: nf4Map, Absmax: []float32{1, 1}}
	assert.NoError(t, b.Check(64))
	assert.ErrorContains(t, b.Check(63), "needs 64")
	b.Absmax = []float32{1}
	assert.ErrorContains(t, b.Check(64), "absmax has 1 values")
	b.Absmax = []float32{1, float32(math.NaN())}
	assert.ErrorContains(t, b.Check(64), "NaN")
}

func TestInt8RoundTrip(t *testing.T) {
	w := randn(16*40, 9, 1)
	copy(w[3*40:4*40], make([]float32, 40)) // a zero row
	q, scb := make([]byte, len(w)), make([]float32, 16)
	Int8Quantize(q, scb, w, 16, 40)
	assert.Equal(t, float32(0), scb[3])
	deq := make([]float32, len(w))
	Int8Dequantize(deq, q, scb, 16, 40)
	for i := range w {
		assert.InDelta(t, w[i], deq[i], float64(scb[i/40])/254*1.0001)
	}
	q2, scb2 := make([]byte, len(w)), make([]float32, 16)
	Int8Quantize(q2, scb2, deq, 16, 40)
	assert.Equal(t, q, q2)
}

func TestMXFP4(t *testing.T) {
	// one group: the values of the codes times 2^-3, low nibble first
	blocks := make([]byte, 16)
	for i := range blocks {
		blocks[i] = byte(2*i%16) | byte((2*i+1)%16)<<4
	}
	dst := make([]float32, 32)
	MXFP4Dequantize(dst, blocks, []byte{124})
	for i := range dst {
		assert.Equal(t, FP4Values[i%16]/8, dst[i], "element %d", i)
	}
	b2, s2 := make([]byte, 16), make([]byte, 1)
	MXFP4Quantize(b2, s2, dst)
	assert.Equal(t, []byte{124}, s2)
	assert.Equal(t, blocks, b2)
	for _, c := range []struct {
		x    float32
		want byte
	}{
		{0.25, 0}, {0.75, 2}, {1.25, 2}, {1.75, 4}, {2.5, 4}, {3.5, 6}, {5, 6}, {7, 7}, {-0.3, 9},
		{math.Nextafter32(0.25, 1), 1}, {math.Nextafter32(5, 0), 6}, {math.Nextafter32(5, 6), 7}, {6, 7}, {float32(math.Inf(-1)), 15},
		{float32(math.Copysign(0, -1)), 8}, {1e-40, 0}, {float32(math.NaN()), 3},
	} {
		assert.Equal(t, c.want, e2m1Code(c.x), "x = %v", c.x)
	}
	// torchao's special cases: an all-zero group gets scale byte 0 but is divided by 2^-126; a NaN makes the
	// scale 255 (+Inf divisor: the finite values become zeros); an infinity makes it 253.
	tiny := make([]float32, 32)
	tiny[0], tiny[1] = 0x1p-126, 0x1p-127
	MXFP4Quantize(b2, s2, tiny)
	assert.Equal(t, []byte{0}, s2)
	assert.Equal(t, byte(0x12), b2[0]) // 2^-126 / 2^-126 = 1 (code 2), 2^-127 / 2^-126 = 0.5 (code 1)
	tiny[5] = float32(math.NaN())
	MXFP4Quantize(b2, s2, tiny)
	assert.Equal(t, []byte{255}, s2)
	assert.Equal(t, byte(0), b2[0])
	tiny[5] = float32(math.Inf(1))
	MXFP4Quantize(b2, s2, tiny)
	assert.Equal(t, []byte{253}, s2)
	assert.Equal(t, byte(0x70), b2[2])
}

// e4m3Reference rounds to float8_e4m3fn by its definition (float64 arithmetic, saturating): what the bit
// arithmetic of Float32ToE4M3 must equal.
func e4m3Reference(x float32) uint8 {
	if x != x {
		return 0x7f
	}
	var sign uint8
	a := float64(x)
	if math.Signbit(a) {
		sign, a = 0x80, -a
	}
	if a >= E4M3Max {
		return sign | 0x7e
	}
	if a < math.Ldexp(1, -6) {
		return sign | uint8(math.RoundToEven(a*512))
	}
	frac, exp := math.Frexp(a)
	e := exp - 1
	m := math.RoundToEven((2*frac - 1) * 8)
	if m == 8 {
		m, e = 0, e+1
	}
	return sign | uint8(e+7)<<3 | uint8(m)
}

func TestFloat32ToE4M3MatchesItsDefinition(t *testing.T) {
	r := rand.New(rand.NewPCG(5, 6))
	check := func(x float32) {
		if got, want := Float32ToE4M3(x), e4m3Reference(x); got != want && x == x {
			t.Fatalf("x = %v (%#x): got %#x, want %#x", x, math.Float32bits(x), got, want)
		}
	}
	for i := 0; i < 2_000_000; i++ {
		check(math.Float32frombits(r.Uint32()))
		check(float32(r.NormFloat64() * math.Ldexp(1, r.IntN(20)-12)))
	}
	for b := 0; b < 256; b++ { // every value and the midpoints around it
		v := e4m3Table[b]
		check(v)
		check(math.Nextafter32(v, float32(math.Inf(1))))
		check(math.Nextafter32(v, float32(math.Inf(-1))))
		if b < 0x7e {
			mid := (v + e4m3Table[b+1]) / 2
			check(mid)
			check(math.Nextafter32(mid, 0))
		}
	}
}

func TestBlockwise8LUTAndIndex(t *testing.T) {
	code := []float32{-1, -0.5, 0, 0.5, 1} // midpoints -0.75, -0.25, 0.25, 0.75
	lut := Blockwise8LUT(code)
	require.Len(t, lut, 65536)
	for _, c := range []struct {
		s    float32
		want byte
	}{
		{-2, 0}, {-1, 0}, {-0.76, 0}, {-0.74, 1}, {0, 2}, {0.2, 2}, {0.3, 3}, {0.76, 4}, {1, 4}, {3, 4},
	} {
		assert.Equal(t, c.want, lut[blockwise8Index(c.s)], "s=%v", c.s)
	}
	// the table's bins are 2 / 65535 wide: a value just above a midpoint can take the lower code
	assert.Equal(t, byte(2), lut[blockwise8Index(0.25+1e-6)])
	assert.Equal(t, uint16(0), blockwise8Index(-1))
	assert.Equal(t, uint16(65535), blockwise8Index(1))
	assert.Equal(t, uint16(32768), blockwise8Index(0)) // fma(0.5, 65535, 0.5) = 32768 exactly
}

func TestQuantizeBlockwise8ZeroBlockAndScale(t *testing.T) {
	code := []float32{-1, -0.5, 0, 0.5, 1}
	x := []float32{0, 0, 0, -4, 2, 1.01, 4}
	codes, absmax := make([]byte, len(x)), make([]float32, 3)
	QuantizeBlockwise8(codes, absmax, x, code, 3)
	assert.Equal(t, []float32{0, 4, 4}, absmax)
	assert.Equal(t, []byte{0, 0, 0, 0, 3, 3, 4}, codes) // 1.01 / 4 = 0.2525: just past the midpoint 0.25
}
