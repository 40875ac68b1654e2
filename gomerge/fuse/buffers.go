package fuse

import (
	"slices"
	"sync"
)

// tensorBuffers recycles the float32 tensors of a fuse: a buffer given back
// serves any later tensor that fits in it, so that the tensors are neither
// allocated nor cleared again (a fresh allocation is zeroed, and the
// collector runs the more often the more is allocated). The buffers held,
// in use or free, stay within limit bytes (the memory budget of the
// tensors computed at once): beyond it the free ones are dropped for the
// collector, and a tensor larger than every free buffer gets its own
// exact-size one.
type tensorBuffers struct {
	mu    sync.Mutex
	free  [][]float32 // by capacity, smallest first
	held  int64       // bytes of the buffers in use and free
	limit int64
}

func newTensorBuffers(limit int64) *tensorBuffers { return &tensorBuffers{limit: limit} }

// get returns a buffer of n values with undefined contents.
func (b *tensorBuffers) get(n int) []float32 {
	b.mu.Lock()
	defer b.mu.Unlock()
	if i, _ := slices.BinarySearchFunc(b.free, n, func(x []float32, n int) int { return cap(x) - n }); i < len(b.free) {
		x := b.free[i]
		b.free = slices.Delete(b.free, i, i+1)
		return x[:n]
	}
	b.held += 4 * int64(n)
	for len(b.free) > 0 && b.held > b.limit { // drop the largest free ones first
		x := b.free[len(b.free)-1]
		b.free = b.free[:len(b.free)-1]
		b.held -= 4 * int64(cap(x))
	}
	return make([]float32, n)
}

// put gives a buffer from get back.
func (b *tensorBuffers) put(x []float32) {
	b.mu.Lock()
	defer b.mu.Unlock()
	i, _ := slices.BinarySearchFunc(b.free, cap(x), func(y []float32, c int) int { return cap(y) - c })
	b.free = slices.Insert(b.free, i, x[:0])
}
