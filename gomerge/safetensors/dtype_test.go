package safetensors

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/errs"
)

func TestEncodeDecodeRoundTrip(t *testing.T) {
	x := []float32{0, 1, -1.5, 3.1415927, 1e-3, -65504, 1e-7}
	for _, dt := range []DType{F32, BF16, F16} {
		t.Run(string(dt), func(t *testing.T) {
			got := Decode(dt, Encode(dt, x))
			require.Len(t, got, len(x))
			for i := range x {
				assert.Equal(t, Round(dt, x[i]), got[i])
			}
		})
	}
}

func TestParseDType(t *testing.T) {
	for in, want := range map[string]DType{"float32": F32, "torch.bfloat16": BF16, "F16": F16, "half": F16} {
		got, err := ParseDType(in)
		require.NoError(t, err)
		assert.Equal(t, want, got)
	}
	_, err := ParseDType("int8")
	require.Error(t, err)
	assert.Equal(t, errs.KindValue, errs.KindOf(err))
}

func BenchmarkDecodeBF16(b *testing.B) {
	raw := Encode(BF16, make([]float32, 1<<20))
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		Decode(BF16, raw)
	}
}

func BenchmarkEncodeBF16(b *testing.B) {
	x := make([]float32, 1<<20)
	b.SetBytes(int64(4 * len(x)))
	for b.Loop() {
		Encode(BF16, x)
	}
}

func BenchmarkDecodeF16(b *testing.B) {
	raw := Encode(F16, make([]float32, 1<<20))
	b.SetBytes(int64(len(raw)))
	for b.Loop() {
		Decode(F16, raw)
	}
}

// EncodeInto appends Encode's bytes, at any alignment of the destination.
func TestEncodeInto(t *testing.T) {
	x := []float32{1, -2.5, 3.1415927, 1e-3, 65504}
	for _, dt := range []DType{F32, BF16, F16} {
		for _, prefix := range [][]byte{nil, {7}, {7, 8}} {
			got := EncodeInto(append([]byte(nil), prefix...), dt, x)
			assert.Equal(t, append(append([]byte(nil), prefix...), Encode(dt, x)...), got, "%s after %d bytes", dt, len(prefix))
		}
	}
}
