// Package pool recycles float32 scratch buffers (factors read from files,
// candidates of magnitude pruning, dense updates), one pool per power-of-two
// capacity, so that a merge of many modules neither allocates nor clears
// them each time. Package gomerge and its kernels share it.
package pool

import (
	"math/bits"
	"sync"
	"unsafe"
)

var pools [40]sync.Pool

// minPooled is the smallest capacity worth pooling.
const minPooled = 1 << 10

// Get returns a float32 buffer of length n with undefined contents.
func Get(n int) []float32 {
	if n < minPooled {
		return make([]float32, n)
	}
	c := bits.Len(uint(n - 1)) // capacity class: 2^c >= n
	if p, ok := pools[c].Get().(*[]float32); ok {
		return (*p)[:n]
	}
	return make([]float32, n, 1<<c)
}

// Put gives a buffer from Get back to its pool.
func Put(b []float32) {
	if cap(b) < minPooled {
		return
	}
	if c := bits.Len(uint(cap(b) - 1)); cap(b) == 1<<c {
		pools[c].Put(&b)
	}
}

// MaxScratch64 is the largest float64 buffer (4 MiB) that Get64 takes from
// the pools: a larger one is allocated, and Put64 drops it. The pools round
// a size up to a power of two and keep a buffer past the merge that used
// it: pooled without a bound, the SVD's stacks of bench S3 (45 MiB and
// more) raised its peak RSS from about 500 to about 580 MiB. At those
// sizes the allocator's clearing costs little against the arithmetic.
const MaxScratch64 = 1 << 19

// Get64 returns a float64 buffer of length n with undefined contents: up
// to MaxScratch64 values, the memory of a float32 buffer from Get, twice as
// long.
func Get64(n int) []float64 {
	if n > MaxScratch64 {
		return make([]float64, n)
	}
	b := Get(2 * n)
	return unsafe.Slice((*float64)(unsafe.Pointer(unsafe.SliceData(b))), cap(b)/2)[:n] // Put64 needs the capacity
}

// Put64 gives a buffer from Get64 back to its pool.
func Put64(b []float64) {
	if cap(b) > MaxScratch64 {
		return
	}
	Put(unsafe.Slice((*float32)(unsafe.Pointer(unsafe.SliceData(b))), 2*cap(b)))
}
