package pool

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// Buffers have the length asked for; pooled ones a power-of-two capacity.
func TestGetPut(t *testing.T) {
	for _, tc := range []struct {
		name       string
		n, wantCap int
	}{
		{"small, not pooled", 10, 10},
		{"smallest pooled", minPooled, minPooled},
		{"rounded up", minPooled + 1, 2 * minPooled},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := Get(tc.n)
			assert.Len(t, b, tc.n)
			assert.Equal(t, tc.wantCap, cap(b))
			Put(b)
			Put(make([]float32, 3*minPooled)) // not a power of two: dropped
			assert.Len(t, Get(tc.n), tc.n)
		})
	}
}

// Get64's buffers keep the capacity of the float32 memory under them, so
// that Put64 can give them back (a view as long as n would be dropped).
func TestGet64Put64(t *testing.T) {
	for _, tc := range []struct {
		name       string
		n, wantCap int
	}{
		{"small, not pooled", 10, 10},
		{"smallest pooled", minPooled / 2, minPooled / 2},
		{"rounded up", minPooled/2 + 1, minPooled},
		{"largest pooled", MaxScratch64, MaxScratch64},
		{"too large to pool: allocated as asked", MaxScratch64 + 1, MaxScratch64 + 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := Get64(tc.n)
			assert.Len(t, b, tc.n)
			assert.Equal(t, tc.wantCap, cap(b))
			b[tc.n-1] = 1.5 // the memory is float64's to use
			Put64(b)
			assert.Len(t, Get64(tc.n), tc.n)
		})
	}
}
