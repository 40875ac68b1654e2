package methods

import (
	"encoding/binary"
	"math"
	"math/bits"
	"math/rand/v2"
	"slices"
	"strconv"

	"gomerge/gomerge/kernels"
	"gomerge/gomerge/parallel"
	"gomerge/gomerge/safetensors"
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
// (linear in the row, where a comparison sort is n log n). The three
// histograms are counted in one read of the keys, and a pass whose digit
// is the same for every key (it would move nothing) is skipped. tmp has
// the length of key.
func sortByMagnitude(key, tmp []uint64) {
	if len(key) < 64 {
		slices.Sort(key) // the index bits break ties as the stable order does
		return
	}
	const digit, mask = 11, 1<<11 - 1
	var count [3][1 << digit]uint32
	for _, k := range key {
		count[0][(k>>32)&mask]++
		count[1][(k>>(32+digit))&mask]++
		count[2][(k>>(32+2*digit))&mask]++
	}
	src, dst := key, tmp
	n := uint32(len(key))
	for pass := range count {
		c := &count[pass]
		shift := uint(32 + pass*digit)
		if c[(src[0]>>shift)&mask] == n {
			continue // one digit for all: the pass is the identity
		}
		var sum uint32
		for i, v := range c {
			c[i], sum = sum, sum+v
		}
		for _, k := range src {
			d := (k >> shift) & mask
			dst[c[d]] = k
			c[d]++
		}
		src, dst = dst, src
	}
	if &src[0] != &key[0] {
		copy(key, src)
	}
}

// dellaLimits is the table of DELLA's draw limits by rank for a row of
// cols entries: an entry of 0-based rank r (ascending magnitude) is kept
// when its uniform 64-bit draw is below limits[r] = p * 2^64, with p the
// probability of DellaProbs (the same float64 expression, so the same bits).
func dellaLimits(cols int, density, epsilon float64) []uint64 {
	limits := make([]uint64, cols)
	if cols == 1 {
		limits[0] = uint64(density * 0x1p64)
		return limits
	}
	for rank := range limits {
		rn := float64(rank) / float64(cols-1)
		limits[rank] = uint64(((density - epsilon) + rn*2*epsilon) * 0x1p64)
	}
	return limits
}

// dellaRow prunes one slice (row[c*stride] for c < len(lim)) of DellaPrune
// by the limits of dellaLimits: lim and key are scratch of len(limits) and
// 2 * len(limits). It returns the l1 norms of the slice before and after
// (float64 sums in column order). Dropped entries become +0; the draws are
// made in column order, one per entry, whatever the ranks.
func dellaRow(row []float32, stride int, limits, lim, key []uint64, rng *rand.PCG) (before, after float64) {
	cols := len(limits)
	if cols == 1 {
		lim[0] = limits[0]
	} else {
		for c := range cols {
			key[c] = uint64(math.Float32bits(row[c*stride])&0x7fffffff)<<32 | uint64(c)
		}
		sortByMagnitude(key[:cols], key[cols:2*cols])
		for rank, k := range key[:cols] {
			lim[uint32(k)] = limits[rank]
		}
	}
	lim = lim[:cols]
	if stride == 1 {
		row = row[:cols]
		for c, l := range lim {
			v := math.Float32bits(row[c])
			av := float64(math.Float32frombits(v & 0x7fffffff))
			_, keep := bits.Sub64(rng.Uint64(), l, 0) // 1 when the draw is below the limit
			before += av
			after += math.Float64frombits(math.Float64bits(av) & -keep) // + (+0) leaves the sum (never -0) as it is
			row[c] = math.Float32frombits(v & -uint32(keep))
		}
		return before, after
	}
	for c, l := range lim {
		i := c * stride
		v := math.Float32bits(row[i])
		av := float64(math.Float32frombits(v & 0x7fffffff))
		_, keep := bits.Sub64(rng.Uint64(), l, 0)
		before += av
		after += math.Float64frombits(math.Float64bits(av) & -keep)
		row[i] = math.Float32frombits(v & -uint32(keep))
	}
	return before, after
}

// dellaRowBuckets is dellaRow without sorting, for non-decreasing limits
// (epsilon >= 0): the magnitudes (float32 bits without the sign, ordered as
// the magnitudes are) are counted into buckets of consecutive bit ranges,
// so that an entry of bucket b has a rank from start[b] to start[b+1] - 1,
// and its draw u is decided by the bucket alone when u < limits[start[b]]
// (kept) or u >= limits[start[b+1]-1] (dropped). Only a draw between the
// two (about (bucket size) * 2 epsilon / cols of them) needs the entry's
// exact rank, counted over the row. The decisions, and so the masks and
// the sums, are dellaRow's. w is scratch for rows of len(limits) entries
// (newDellaScratch).
func dellaRowBuckets(row []float32, stride int, limits []uint64, w *dellaScratch, rng *rand.PCG) (before, after float64) {
	w.fill(row, stride, len(limits))
	st := &w.start
	ghi, glo := pcgState(rng) // the stream's state in registers (through *rng it goes to memory at each draw)
	if stride == 1 {
		row = row[:len(w.bucket)]
		for c, b := range w.bucket {
			var u uint64
			ghi, glo, u = pcgUint64(ghi, glo)
			first, last := limits[st[b&(dellaBuckets-1)]], limits[st[b&(dellaBuckets-1)+1]-1]
			_, keep := bits.Sub64(u, first, 0) // 1 when the draw is below the bucket's lowest limit
			if u-first < last-first {          // first <= u < last: the exact rank decides
				keep = w.exact(limits, c, u)
			}
			v := math.Float32bits(row[c])
			av := float64(math.Float32frombits(v & 0x7fffffff))
			before += av
			after += math.Float64frombits(math.Float64bits(av) & -keep) // + (+0) leaves the sum (never -0) as it is
			row[c] = math.Float32frombits(v & -uint32(keep))
		}
		return before, after
	}
	for c, b := range w.bucket {
		var u uint64
		ghi, glo, u = pcgUint64(ghi, glo)
		first, last := limits[st[b&(dellaBuckets-1)]], limits[st[b&(dellaBuckets-1)+1]-1]
		_, keep := bits.Sub64(u, first, 0)
		if u-first < last-first {
			keep = w.exact(limits, c, u)
		}
		i := c * stride
		v := math.Float32bits(row[i])
		av := float64(math.Float32frombits(v & 0x7fffffff))
		before += av
		after += math.Float64frombits(math.Float64bits(av) & -keep)
		row[i] = math.Float32frombits(v & -uint32(keep))
	}
	return before, after
}

// pcgState is the state of p (as its MarshalBinary writes it: "pcg:", then
// hi and lo big-endian).
func pcgState(p *rand.PCG) (hi, lo uint64) {
	b, err := p.MarshalBinary()
	if err != nil || len(b) != 20 {
		panic("gomerge: unexpected math/rand/v2.PCG state")
	}
	return binary.BigEndian.Uint64(b[4:12]), binary.BigEndian.Uint64(b[12:20])
}

// pcgUint64 is math/rand/v2's PCG.Uint64 on the state hi, lo (the same
// 128-bit LCG step and DXSM output, with its constants): it returns the
// next state and the draw. TestPCGUint64 checks it against the library.
func pcgUint64(hi, lo uint64) (nhi, nlo, u uint64) {
	const (
		mulHi    = 2549297995355413924
		mulLo    = 4865540595714422341
		incHi    = 6364136223846793005
		incLo    = 1442695040888963407
		cheapMul = 0xda942042e4dd58b5
	)
	nhi, nlo = bits.Mul64(lo, mulLo)
	nhi += hi*mulLo + lo*mulHi
	nlo, c := bits.Add64(nlo, incLo, 0)
	nhi, _ = bits.Add64(nhi, incHi, c)
	u = nhi
	u ^= u >> 32
	u *= cheapMul
	u ^= u >> 48
	u *= nlo | 1
	return nhi, nlo, u
}

// dellaScratch is the scratch of dellaRowBuckets for rows of up to cols
// entries: their magnitudes, their buckets, and the first rank of each
// bucket (start[b], with start[nb] = cols).
type dellaScratch struct {
	mag    []uint32
	bucket []uint16
	start  [dellaBuckets + 1]uint32
}

func newDellaScratch(cols int) *dellaScratch {
	return &dellaScratch{mag: make([]uint32, cols), bucket: make([]uint16, cols)}
}

// fill computes the magnitudes, buckets and bucket starts of a row of cols
// entries: entry c of magnitude m is in bucket (max(m, lo) - lo) >> shift.
func (w *dellaScratch) fill(row []float32, stride, cols int) {
	mag, bucket := w.mag[:cols], w.bucket[:cols]
	w.mag, w.bucket = mag, bucket
	lo, hi := uint32(math.MaxUint32), uint32(0)
	for c := range mag {
		m := math.Float32bits(row[c*stride]) & 0x7fffffff
		mag[c] = m
		lo, hi = min(lo, m), max(hi, m)
	}
	// buckets of 2^shift bit values from lo: at most about one per entry, and dellaBuckets; the magnitudes
	// below the top dellaBinades binades of the row share the first bucket (they are few: the others get
	// smaller buckets)
	lo = max(lo, hi-min(hi, dellaBinades<<23-1))
	nb := min(dellaBuckets, 1<<bits.Len(uint(cols-1)))
	shift := uint(max(0, bits.Len32(hi-lo)-bits.Len(uint(nb-1)))) & 31
	start := w.start[:nb+1]
	clear(start)
	for c, m := range mag {
		b := (max(m, lo) - lo) >> shift // < nb
		bucket[c] = uint16(b)
		start[b+1]++
	}
	var sum uint32 // in a register: start[b] += start[b-1] would wait for each store
	for b, n := range start {
		sum += n
		start[b] = sum
	}
}

// exact is 1 when the draw u keeps entry c by its exact rank, else 0: for
// a draw between its bucket's lowest and highest limits (rare: not
// inlined).
//
//go:noinline
func (w *dellaScratch) exact(limits []uint64, c int, u uint64) uint64 {
	_, keep := bits.Sub64(u, limits[kernels.MagnitudeRank(w.mag, c)], 0)
	return keep
}

// dellaBuckets is the most buckets of dellaRowBuckets, over the top
// dellaBinades binades of a row's magnitudes.
const (
	dellaBuckets = 1 << 12
	dellaBinades = 8
)

// nonDecreasing reports whether limits never decrease with the rank.
func nonDecreasing(limits []uint64) bool {
	for r := 1; r < len(limits); r++ {
		if limits[r] < limits[r-1] {
			return false
		}
	}
	return true
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
	if scale := dellaMask(t, rows, cols, inner, density, epsilon, rescale, source); scale != 1 {
		for i := range t {
			t[i] *= scale // RescaleL1
		}
	}
}

// dellaMask is DellaPrune without the rescale's multiplication: it masks t
// and returns the factor of the l1 rescale (before / after in float32, as
// RescaleL1 multiplies by it), or 1 without rescale or when RescaleL1 would
// leave t as it is.
func dellaMask(t []float32, rows, cols, inner int, density, epsilon float64, rescale bool, source func(slice int) *rand.PCG) float32 {
	if density >= 1 {
		return 1
	}
	if density <= 0 {
		clear(t)
		return 1
	}
	nSlices := rows * inner
	before := make([]float64, nSlices) // the l1 norms of each slice, summed in slice order below
	after := make([]float64, nSlices)
	limits := dellaLimits(cols, density, epsilon)
	buckets := cols > 1 && nonDecreasing(limits)
	parallel.For(nSlices, max(1, combineGrain/max(1, cols)), func(lo, hi int) {
		var lim, key []uint64
		var w *dellaScratch
		if buckets {
			w = newDellaScratch(cols)
		} else {
			lim, key = make([]uint64, cols), make([]uint64, 2*cols)
		}
		for s := lo; s < hi; s++ {
			r, in := s/inner, s%inner
			if buckets {
				before[s], after[s] = dellaRowBuckets(t[r*cols*inner+in:], inner, limits, w, source(s))
			} else {
				before[s], after[s] = dellaRow(t[r*cols*inner+in:], inner, limits, lim, key, source(s))
			}
		}
	})
	if !rescale {
		return 1
	}
	var b, a float64
	for s := range before {
		b += before[s]
		a += after[s]
	}
	return rescaleL1Factor(float32(b), float32(a))
}

// fusedDella reports whether mergeDenseSVD computes the module's dense
// updates and DELLA's masks row by row (dellaDense): DELLA on a Linear
// module (rows of the update are DELLA's slices) with a density in (0, 1)
// and non-decreasing limits.
func (g *generalized) fusedDella(j *ModuleJob) bool {
	_, _, inner := j.layout()
	return g.pruning == PruneDELLA && inner == 1 && g.density > 0 && g.density < 1 && j.In > 1 &&
		nonDecreasing(dellaLimits(j.In, g.density, g.epsilon))
}

// dellaDense writes into dw the dense update of source s (denseDelta, then
// rounded to s.roundDW), pruned by DELLA (dellaMask of it, with the same
// streams: source index s.index, slice = row), row by row while each row is
// in the cache, and returns the factor of its l1 rescale (dellaMask's).
func (g *generalized) dellaDense(dw, a, b []float32, j *ModuleJob, s Source) float32 {
	out, in, r := j.Out, j.In, s.Mod.Rank
	scaling := float32(s.Mod.Scaling)
	round := s.RoundDW != "" && s.RoundDW != safetensors.F32
	limits := dellaLimits(in, g.density, g.epsilon)
	source := dellaSource(g.seed, j.Name, s.Index)
	before := make([]float64, out)
	after := make([]float64, out)
	parallel.For(out, max(1, combineGrain/max(1, in)), func(lo, hi int) {
		as := make([]float32, r)
		xs := make([][]float32, r)
		w := newDellaScratch(in)
		for i := lo; i < hi; i++ {
			row := dw[i*in : (i+1)*in]
			n := 0
			for k := 0; k < r; k++ {
				if c := b[i*r+k]; c != 0 {
					as[n], xs[n] = c, a[k*in:(k+1)*in]
					n++
				}
			}
			kernels.DenseRow(row, as[:n], xs[:n], scaling)
			if round {
				roundTo(row, s.RoundDW)
			}
			before[i], after[i] = dellaRowBuckets(row, 1, limits, w, source(i))
		}
	})
	if !g.rescale {
		return 1
	}
	var bs, as float64
	for i := range before {
		bs += before[i]
		as += after[i]
	}
	return rescaleL1Factor(float32(bs), float32(as))
}

// rescaleL1Factor is the factor of RescaleL1 (1 when it leaves t as it is).
func rescaleL1Factor(before, after float32) float32 {
	const eps = 1e-7
	if before < eps || after < eps {
		return 1
	}
	return before / after
}

// RescaleL1 multiplies t by before / after (float32), mergekit's
// rescaled_masked_tensor with the l1 norm: a norm below 1e-7 leaves t as
// it is.
func RescaleL1(t []float32, before, after float32) {
	if scale := rescaleL1Factor(before, after); scale != 1 {
		for i := range t {
			t[i] *= scale
		}
	}
}

// dellaSource is the stream of one slice of DELLA's mask of source
// adapter index in a module: it depends only on the seed, the module, the
// adapter's position and the slice.
func dellaSource(seed uint64, module string, index int) func(slice int) *rand.PCG {
	label := "della/" + strconv.Itoa(index) + "/"
	return func(slice int) *rand.PCG { return TensorSource(seed, module, label+strconv.Itoa(slice)) }
}
