package methods

import (
	"cmp"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/safetensors"
	"math"
	"math/rand/v2"
	"runtime"
	"slices"
	"sort"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// dellaBySort is the reference della_magprune, written as mergekit's code
// reads: per (row, inner) slice, ranks from a stable argsort of the
// magnitudes, rank_norm = (rank - min) / (max - min), probabilities
// (density - epsilon) + rank_norm * 2 * epsilon, one draw per entry in
// column order from the slice's stream, then the l1 rescale of the whole
// tensor.
func dellaBySort(t []float32, rows, cols, inner int, density, epsilon float64, rescale bool, source func(int) *rand.PCG) []float32 {
	out := append([]float32(nil), t...)
	if density >= 1 {
		return out
	}
	for s := 0; s < rows*inner; s++ {
		r, in := s/inner, s%inner
		at := func(c int) int { return r*cols*inner + c*inner + in }
		idx := make([]int, cols)
		for c := range idx {
			idx[c] = c
		}
		sort.SliceStable(idx, func(a, b int) bool { return abs32(t[at(idx[a])]) < abs32(t[at(idx[b])]) })
		ranks := make([]float64, cols)
		for pos, c := range idx {
			ranks[c] = float64(pos + 1)
		}
		rng := source(s)
		for c := 0; c < cols; c++ {
			p := density
			if cols > 1 {
				p = (density - epsilon) + (ranks[c]-1)/float64(cols-1)*2*epsilon
			}
			if rng.Uint64() >= uint64(p*0x1p64) {
				out[at(c)] = 0
			}
		}
	}
	if rescale {
		var before, after float64
		for i := range t {
			before += math.Abs(float64(t[i]))
			after += math.Abs(float64(out[i]))
		}
		if float32(before) >= 1e-7 && float32(after) >= 1e-7 {
			scale := float32(before) / float32(after)
			for i := range out {
				out[i] *= scale
			}
		}
	}
	return out
}

func testSource(seed uint64) func(int) *rand.PCG { return dellaSource(seed, "m", 0) }

func TestDellaProbs(t *testing.T) {
	row := []float32{0.5, -3, 1, 0.5, -0.1}
	p := make([]float64, len(row))
	DellaProbs(p, row, 1, 0.4, 0.2, make([]uint64, 2*len(row)))
	// ascending: -0.1 (4), 0.5 (0), 0.5 (3), 1 (2), -3 (1): ranks 0..4 of 4
	want := []float64{0.2 + 0.25*0.4, 0.2 + 1*0.4, 0.2 + 0.75*0.4, 0.2 + 0.5*0.4, 0.2}
	assert.InDeltaSlice(t, want, p, 1e-15)
	one := make([]float64, 1)
	DellaProbs(one, []float32{7}, 1, 0.4, 0.2, make([]uint64, 2))
	assert.Equal(t, []float64{0.4}, one) // mergekit's 0/0: density
}

func TestDellaPruneIsTheReference(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 6))
	for _, c := range []struct {
		rows, cols, inner int
		density, epsilon  float64
		rescale           bool
	}{
		{8, 16, 1, 0.5, 0.1, true},
		{8, 16, 1, 0.3, 0.25, false},
		{5, 1, 1, 0.5, 0.1, true}, // one column
		{4, 6, 9, 0.4, 0.3, true}, // a Conv2d's out x in x (3 x 3)
		{64, 112, 1, 0.2, 0.15, true},
		{3, 4100, 1, 0.4, 0.15, true}, // rows of the radix sort
		{5, 70, 3, 0.4, 0.15, true},   // slices of the radix sort with a stride
		{3, 10, 1, 1, 0.1, true},      // density 1: untouched
		{3, 10, 1, 0, 0.1, true},      // density 0: zeros
		{3, 10, 1, 0.5, 0, true},      // epsilon 0
		{3, 10, 1, 0.5, 0.49, true},
	} {
		x := make([]float32, c.rows*c.cols*c.inner)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
			if i%7 == 0 {
				x[i] = float32(i % 3) // ties of equal magnitude, zeros
			}
		}
		want := dellaBySort(x, c.rows, c.cols, c.inner, c.density, c.epsilon, c.rescale, testSource(9))
		if c.density <= 0 {
			want = make([]float32, len(x))
		}
		DellaPrune(x, c.rows, c.cols, c.inner, c.density, c.epsilon, c.rescale, testSource(9))
		require.Equal(t, want, x, "%+v", c)
	}
}

// With epsilon 0 every probability is density: DELLA is a Bernoulli(density) mask (the draws u < density * 2^64
// of each row's stream) followed by the l1 rescale.
func TestDellaWithoutEpsilonIsBernoulliWithL1Rescale(t *testing.T) {
	rng := rand.New(rand.NewPCG(7, 8))
	rows, cols, density := 32, 50, 0.3
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	want := append([]float32(nil), x...)
	var before, after float64
	for r := 0; r < rows; r++ {
		src := testSource(11)(r)
		for c := 0; c < cols; c++ {
			i := r*cols + c
			before += math.Abs(float64(want[i]))
			if src.Uint64() < uint64(density*0x1p64) {
				after += math.Abs(float64(want[i]))
			} else {
				want[i] = 0
			}
		}
	}
	for i := range want {
		want[i] *= float32(before) / float32(after)
	}
	DellaPrune(x, rows, cols, 1, density, 0, true, testSource(11))
	require.Equal(t, want, x)
	var l1 float64
	for _, v := range x {
		l1 += math.Abs(float64(v))
	}
	assert.InDelta(t, before, l1, 1e-4*before) // the l1 norm is restored
}

func TestDellaKeepsDensityPerRowAndIsDeterministic(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 10))
	rows, cols, density, epsilon := 200, 400, 0.3, 0.2
	x := make([]float32, rows*cols)
	for i := range x {
		x[i] = float32(rng.NormFloat64())
	}
	a := append([]float32(nil), x...)
	DellaPrune(a, rows, cols, 1, density, epsilon, false, testSource(1))
	// the large magnitudes are kept more often: the top decile of each row at about density + 0.9 epsilon
	kept, topKept, top := 0, 0, 0
	for r := 0; r < rows; r++ {
		p := make([]float64, cols)
		DellaProbs(p, x[r*cols:(r+1)*cols], 1, density, epsilon, make([]uint64, 2*cols))
		for c := 0; c < cols; c++ {
			if a[r*cols+c] != 0 {
				kept++
			}
			if p[c] >= density+0.8*epsilon {
				top++
				if a[r*cols+c] != 0 {
					topKept++
				}
			}
		}
	}
	n := float64(rows * cols)
	assert.InDelta(t, density, float64(kept)/n, 4*math.Sqrt(density*(1-density)/n))
	assert.InDelta(t, density+0.9*epsilon, float64(topKept)/float64(top), 0.03)
	// the same seed on one core: the same mask; another seed: another
	prev := runtime.GOMAXPROCS(1)
	b := append([]float32(nil), x...)
	DellaPrune(b, rows, cols, 1, density, epsilon, false, testSource(1))
	runtime.GOMAXPROCS(prev)
	require.Equal(t, a, b)
	c := append([]float32(nil), x...)
	DellaPrune(c, rows, cols, 1, density, epsilon, false, testSource(2))
	require.NotEqual(t, a, c)
}

// The radix sort of DellaProbs orders by magnitude and keeps equal
// magnitudes in index order, like a stable sort (rows below and above the
// radix threshold, with many ties and the extreme magnitudes).
func TestSortByMagnitude(t *testing.T) {
	rng := rand.New(rand.NewPCG(9, 9))
	for _, n := range []int{1, 63, 64, 1000, 11008} {
		key := make([]uint64, n)
		for c := range key {
			var mag uint32
			switch rng.IntN(4) {
			case 0:
				mag = uint32(rng.IntN(3)) // ties
			case 1:
				mag = 0x7fffffff
			default:
				mag = rng.Uint32() & 0x7fffffff
			}
			key[c] = uint64(mag)<<32 | uint64(c)
		}
		want := slices.Clone(key)
		slices.SortStableFunc(want, func(a, b uint64) int { return cmp.Compare(a>>32, b>>32) })
		sortByMagnitude(key, make([]uint64, n))
		assert.Equal(t, want, key, "n=%d", n)
	}
}

// The bucketed rows decide every draw as the sorted ones: rows of ties
// (large buckets, many exact ranks), zeros, non-finite values, a wide range
// of magnitudes, short and long rows, a stride.
func TestDellaRowBucketsIsDellaRow(t *testing.T) {
	rng := rand.New(rand.NewPCG(12, 13))
	for _, cols := range []int{2, 3, 17, 64, 100, 1000, 5000} {
		for kind := range 5 {
			for _, eps := range []float64{0, 0.15, 0.39} {
				stride := 1 + kind%2
				row := make([]float32, cols*stride)
				for c := range row {
					switch kind {
					case 0:
						row[c] = float32(rng.NormFloat64())
					case 1:
						row[c] = float32(rng.IntN(4)) * 0.5 // ties and zeros
					case 2:
						row[c] = float32(math.Ldexp(rng.NormFloat64(), rng.IntN(200)-100)) // wide range
					case 3:
						row[c] = []float32{float32(math.Inf(1)), float32(math.NaN()), 0, -1, 1e-40}[rng.IntN(5)]
					default:
						row[c] = 3 // one magnitude
					}
				}
				limits := dellaLimits(cols, 0.4, eps)
				want := slices.Clone(row)
				src := testSource(5)
				wb, wa := dellaRow(want, stride, limits, make([]uint64, cols), make([]uint64, 2*cols), src(kind))
				got := slices.Clone(row)
				gb, ga := dellaRowBuckets(got, stride, limits, newDellaScratch(cols), src(kind))
				for i := range want {
					require.Equal(t, math.Float32bits(want[i]), math.Float32bits(got[i]), "cols %d kind %d eps %v entry %d", cols, kind, eps, i)
				}
				require.Equal(t, math.Float64bits(wb), math.Float64bits(gb))
				require.Equal(t, math.Float64bits(wa), math.Float64bits(ga))
			}
		}
	}
}

// The fused rows of dellaDense (each row computed, rounded and pruned in
// the cache) give the bits of the dense update, its rounding and dellaMask
// one after the other, with and without rescale and rounding.
func TestDellaDenseIsDenseThenMask(t *testing.T) {
	rng := rand.New(rand.NewPCG(14, 15))
	srcs := spanSources(rng, 70, 300, 4)
	srcs[0].Index = 2
	fa, fb, err := srcs[0].Mod.Factors()
	require.NoError(t, err)
	fb[5] = 0 // a zero coefficient (Saxpy skips it)
	j := &ModuleJob{Name: "m.q", Srcs: srcs, In: 300, Out: 70}
	for _, round := range []safetensors.DType{"", safetensors.BF16} {
		for _, name := range []string{"della", "della_linear"} {
			density, seed := 0.3, uint64(5)
			o := Combine{CombinationType: name, Density: &density, Seed: &seed}
			require.NoError(t, o.Validate())
			g := o.generalized(mergekitOf(name))
			g.rescale = name == "della"
			require.True(t, g.fusedDella(j))
			s := srcs[0]
			s.RoundDW = round
			want := linalg.DenseDelta(fa, fb, j.Out, s.Mod.Rank, j.In, s.Mod.Scaling)
			if round != "" {
				roundTo(want, round)
			}
			wantScale := dellaMask(want, j.Out, j.In, 1, g.density, g.epsilon, g.rescale, dellaSource(seed, j.Name, s.Index))
			got := make([]float32, len(want))
			gotScale := g.dellaDense(got, fa, fb, j, s)
			require.Equal(t, math.Float32bits(wantScale), math.Float32bits(gotScale), "%s %q", name, round)
			for e := range want {
				require.Equal(t, math.Float32bits(want[e]), math.Float32bits(got[e]), "%s %q %d", name, round, e)
			}
		}
	}
}

// pcgUint64 from pcgState is math/rand/v2's PCG stream.
func TestPCGUint64(t *testing.T) {
	for _, seed := range [][2]uint64{{0, 0}, {1, 2}, {^uint64(0), 12345}} {
		p := rand.NewPCG(seed[0], seed[1])
		p.Uint64() // from a state that has moved
		hi, lo := pcgState(p)
		for range 1000 {
			var u uint64
			hi, lo, u = pcgUint64(hi, lo)
			require.Equal(t, p.Uint64(), u)
		}
	}
}
