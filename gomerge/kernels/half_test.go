package kernels

import (
	"math"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestFloat32ToBF16(t *testing.T) {
	tests := []struct {
		name string
		in   uint32 // float32 bits
		want uint16
	}{
		{"one", 0x3f800000, 0x3f80},
		{"exact", 0x40490000, 0x4049},
		{"round down below half", 0x3f807fff, 0x3f80},
		{"tie to even (even stays)", 0x3f808000, 0x3f80},
		{"tie to even (odd rounds up)", 0x3f818000, 0x3f82},
		{"round up above half", 0x3f808001, 0x3f81},
		{"negative", 0xbf808001, 0xbf81},
		{"max float rounds to inf", 0x7f7fffff, 0x7f80},
		{"inf", 0x7f800000, 0x7f80},
		{"-inf", 0xff800000, 0xff80},
		{"nan stays nan", 0x7f800001, 0x7fc0},
		{"zero", 0, 0},
		{"-zero", 0x80000000, 0x8000},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, Float32ToBF16(math.Float32frombits(tc.in)))
		})
	}
}

func TestFloat32ToHalf(t *testing.T) {
	tests := []struct {
		name string
		in   float32
		want uint16
	}{
		{"one", 1, 0x3c00},
		{"-two", -2, 0xc000},
		{"max half", 65504, 0x7bff},
		{"overflow", 65520, 0x7c00},   // halfway to 65536 rounds to even: Inf
		{"just below", 65519, 0x7bff}, // rounds down to max
		{"smallest normal", 6.103515625e-05, 0x0400},
		{"smallest subnormal", 5.960464477539063e-08, 0x0001},
		{"half of smallest subnormal ties to zero", 2.9802322387695312e-08, 0x0000},
		{"above half of smallest subnormal", 2.99e-08, 0x0001},
		{"subnormal", 3.0517578125e-05, 0x0200},
		{"1 + 2^-11 ties to even", 1.00048828125, 0x3c00},
		{"1 + 3*2^-11 ties to even up", 1.00146484375, 0x3c02},
		{"inf", float32(math.Inf(1)), 0x7c00},
		{"nan", float32(math.NaN()), 0x7e00},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, Float32ToHalf(tc.in))
		})
	}
}

func TestHalfRoundTripAllValues(t *testing.T) {
	// every finite half converts to float32 and back unchanged
	for h := 0; h < 1<<16; h++ {
		if h&0x7c00 == 0x7c00 && h&0x3ff != 0 {
			continue // NaN payloads are canonicalised
		}
		f := HalfToFloat32(uint16(h))
		require.Equal(t, uint16(h), Float32ToHalf(f), "half %#04x -> %v", h, f)
	}
}

// halfByBranches is the straightforward float32 -> half rounding, case by
// case, the reference for Float32ToHalf's branch-free one.
func halfByBranches(f float32) uint16 {
	b := math.Float32bits(f)
	sign := uint16(b>>16) & 0x8000
	exp := int32(b>>23) & 0xff
	mant := b & 0x7fffff
	switch {
	case exp == 0xff:
		if mant != 0 {
			return sign | 0x7e00
		}
		return sign | 0x7c00
	case exp > 142:
		return sign | 0x7c00
	case exp >= 113:
		h := uint32(exp-112)<<10 | mant>>13
		if rest := mant & 0x1fff; rest > 0x1000 || (rest == 0x1000 && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	case exp >= 102:
		m := mant | 0x800000
		shift := uint32(126 - exp)
		h := m >> shift
		rest := m & (1<<shift - 1)
		half := uint32(1) << (shift - 1)
		if rest > half || (rest == half && h&1 == 1) {
			h++
		}
		return sign | uint16(h)
	}
	return sign
}

func TestFloat32ToHalfRounding(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	for i := 0; i < 1<<21; i++ {
		exp := 95 + rng.Uint32N(161-95) // from below the least subnormal to NaN
		b := rng.Uint32()&0x807fffff | exp<<23
		switch i % 8 {
		case 0: // exactly half way between normal halves, both parities
			b = b&^0x1fff | 0x1000
		case 1: // a zero
			b &= 0x80000000
		case 2: // Inf
			b = b&0x80000000 | 0x7f800000
		}
		f := math.Float32frombits(b)
		require.Equal(t, halfByBranches(f), Float32ToHalf(f), "bits %#08x", b)
	}
}
