package fuse

import (
	"testing"

	"github.com/stretchr/testify/assert"
)

// tensorBuffers: a buffer given back serves the next tensor that fits in
// it (the smallest that fits), a larger tensor gets a new one, and the free
// buffers are dropped once the buffers held pass the limit.
func TestTensorBuffers(t *testing.T) {
	b := newTensorBuffers(4 * 100)
	x := b.get(60)
	assert.Len(t, x, 60)
	b.put(x)
	y := b.get(50) // fits in x's
	assert.Same(t, &x[0], &y[0])
	assert.Len(t, y, 50)
	z := b.get(30) // x's is in use: a new one
	assert.NotSame(t, &x[0], &z[0])
	b.put(y)
	b.put(z)
	w := b.get(20) // the smallest that fits: z's
	assert.Same(t, &z[0], &w[0])
	b.put(w)
	assert.Equal(t, int64(4*90), b.held)
	big := b.get(80) // over the limit with the free ones: they are dropped
	assert.Empty(t, b.free)
	assert.Equal(t, int64(4*80), b.held)
	b.put(big)
	assert.Len(t, b.free, 1)
}
