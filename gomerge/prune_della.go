package gomerge

import (
	"math"
	"math/rand/v2"
	"slices"
	"strconv"
)

// DellaProbs writes into p mergekit's della_magprune keep-probabilities of
// one row of magnitudes: with rank the 1-based position of an entry in the
// row sorted by ascending magnitude (equal magnitudes by index),
// p = (density - epsilon) + (rank - 1) / (cols - 1) * 2 * epsilon, so from
// density - epsilon for the smallest to density + epsilon for the largest.
// A row of one entry gets density (mergekit's 0 / 0 would be NaN). key is
// scratch of 2 * len(p).
func DellaProbs(p []float64, row []float32, stride int, density, epsilon float64, key []uint64) {
	cols := len(p)
	if cols == 1 {
		p[0] = density
		return
	}
	for c := range cols {
		key[c] = uint64(math.Float32bits(row[c*stride])&0x7fffffff)<<32 | uint64(c)
	}
	sortByMagnitude(key[:cols], key[cols:2*cols])
	for rank, k := range key[:cols] {
		rn := float64(rank) / float64(cols-1)
		p[uint32(k)] = (density - epsilon) + rn*2*epsilon
	}
}

// sortByMagnitude sorts keys (magnitude bits << 32 | index, in index order)
// by magnitude, stably, so that equal magnitudes stay in index order: an
// LSD radix sort on the 31 magnitude bits in three passes of 11 bits
// (linear in the row, where a comparison sort is n log n). tmp has the
// length of key.
func sortByMagnitude(key, tmp []uint64) {
	if len(key) < 64 {
		slices.Sort(key) // the index bits break ties as the stable order does
		return
	}
	src, dst := key, tmp
	for shift := uint(32); shift < 32+33; shift += 11 {
		var count [1 << 11]int
		for _, k := range src {
			count[(k>>shift)&(1<<11-1)]++
		}
		sum := 0
		for i, c := range count {
			count[i], sum = sum, sum+c
		}
		for _, k := range src {
			d := (k >> shift) & (1<<11 - 1)
			dst[count[d]] = k
			count[d]++
		}
		src, dst = dst, src
	}
	copy(key, src) // three passes: the result is in tmp
}

// DellaPrune is mergekit's della_magprune, in place, on a tensor laid out
// as rows x cols x inner (a Linear update: inner 1; a Conv2d update
// out x in x kh x kw: rows out, cols in, inner kh*kw): for every (row,
// inner) slice along cols, the keep-probabilities of DellaProbs and a
// Bernoulli mask. With rescale the kept tensor is scaled to the l1 norm of
// the original (mergekit's RescaleNorm.l1: by before/after in float32,
// unless either norm is below 1e-7). density >= 1 keeps t; density <= 0
// zeroes it. Every slice draws from its own stream, source(slice), so the
// masks do not depend on how the slices are spread over goroutines.
func DellaPrune(t []float32, rows, cols, inner int, density, epsilon float64, rescale bool, source func(slice int) *rand.PCG) {
	if density >= 1 {
		return
	}
	if density <= 0 {
		clear(t)
		return
	}
	nSlices := rows * inner
	before := make([]float64, nSlices) // the l1 norms of each slice, summed in slice order below
	after := make([]float64, nSlices)
	parallelFor(nSlices, max(1, combineGrain/max(1, cols)), func(lo, hi int) {
		p := make([]float64, cols)
		key := make([]uint64, 2*cols)
		for s := lo; s < hi; s++ {
			r, in := s/inner, s%inner
			row := t[r*cols*inner+in:]
			DellaProbs(p, row, inner, density, epsilon, key)
			rng := source(s)
			var b, a float64
			for c, pc := range p {
				i := c * inner
				v := row[i]
				b += math.Abs(float64(v))
				if rng.Uint64() < uint64(pc*0x1p64) {
					a += math.Abs(float64(v))
				} else {
					row[i] = 0
				}
			}
			before[s], after[s] = b, a
		}
	})
	if !rescale {
		return
	}
	var b, a float64
	for s := range before {
		b += before[s]
		a += after[s]
	}
	RescaleL1(t, float32(b), float32(a))
}

// RescaleL1 multiplies t by before / after (float32), mergekit's
// rescaled_masked_tensor with the l1 norm: a norm below 1e-7 leaves t as
// it is.
func RescaleL1(t []float32, before, after float32) {
	const eps = 1e-7
	if before < eps || after < eps {
		return
	}
	scale := before / after
	for i := range t {
		t[i] *= scale
	}
}

// dellaSource is the stream of one slice of DELLA's mask of source
// adapter index in a module: it depends only on the seed, the module, the
// adapter's position and the slice.
func dellaSource(seed uint64, module string, index int) func(slice int) *rand.PCG {
	label := "della/" + strconv.Itoa(index) + "/"
	return func(slice int) *rand.PCG { return TensorSource(seed, module, label+strconv.Itoa(slice)) }
}
