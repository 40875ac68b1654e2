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
