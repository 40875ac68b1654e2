package kernels

import (
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// mtSeeded is the state of std::mt19937(seed) (and torch.manual_seed(seed)),
// before its first twist.
func mtSeeded(seed uint32) *[MTWords]uint32 {
	var s [MTWords]uint32
	s[0] = seed
	for j := 1; j < MTWords; j++ {
		s[j] = 1812433253*(s[j-1]^(s[j-1]>>30)) + uint32(j)
	}
	return &s
}

// mtTwistReference is the twist as the C++ standard writes it: word by
// word, indices modulo 624, a branch on the low bit.
func mtTwistReference(s *[MTWords]uint32) {
	for i := range MTWords {
		y := s[i]&mtUpper | s[(i+1)%MTWords]&mtLower
		next := s[(i+mtShift)%MTWords] ^ y>>1
		if y&1 == 1 {
			next ^= mtMatrixA
		}
		s[i] = next
	}
}

// The C++ standard's check of std::mt19937 for every set this CPU runs:
// from the default seed 5489, the first output is 3499211612 and the
// 10000th 4123659995.
func TestMT19937TwistMatchesStd(t *testing.T) {
	for _, k := range runnableSets(t) {
		ownKernel(t, k, "mtTwist", k.mtTwist, nil)
		s := mtSeeded(5489)
		var outs []uint32
		for len(outs) < 10000 {
			k.mtTwist(s)
			for _, y := range s {
				outs = append(outs, MT19937Temper(y))
			}
		}
		assert.Equal(t, uint32(3499211612), outs[0], k.name)
		assert.Equal(t, uint32(4123659995), outs[9999], k.name)
	}
}

// Every set this CPU runs twists as the standard's word-by-word loop does,
// bit for bit, seeded states and random ones, several twists in a row.
func TestMT19937TwistKernels(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(19, 624))
	for _, k := range sets {
		ownKernel(t, k, "mtTwist", k.mtTwist, nil)
	}
	for trial := range 200 {
		var ref [MTWords]uint32
		if trial%2 == 0 {
			ref = *mtSeeded(rng.Uint32())
		} else {
			for i := range ref {
				ref[i] = rng.Uint32()
			}
		}
		got := make([][MTWords]uint32, len(sets))
		for i := range got {
			got[i] = ref
		}
		for twist := range 3 {
			mtTwistReference(&ref)
			for i, k := range sets {
				k.mtTwist(&got[i])
				require.Equal(t, ref, got[i], "%s kernels, trial %d, twist %d", k.name, trial, twist+1)
			}
		}
	}
}

// Every set this CPU runs keeps the same elements as the portable version,
// which keeps word y when float32(temper(y) & 0xFFFFFF) * 2**-24 < p (torch's
// test) for t = ceil(p * 2**24): lengths around the vector widths, the
// thresholds at the ends and around a word's 24 bits.
func TestTemperBernoulliKernels(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(5, 24))
	for _, k := range sets {
		ownKernel(t, k, "temperBernoulli", k.temperBernoulli, nil)
	}
	for _, n := range []int{0, 1, 7, 8, 9, 15, 16, 17, 31, 33, 100, MTWords} {
		words := make([]uint32, n)
		for i := range words {
			words[i] = rng.Uint32()
		}
		for _, p := range []float32{0, 0x1p-24, 0.2, 0.2001953125, 0.5, 0.9, 1} {
			th := uint32(float64(p) * (1 << 24))
			if float64(th) < float64(p)*(1<<24) {
				th++
			}
			want := make([]byte, n)
			for i, y := range words {
				if float32(MT19937Temper(y)&mtLow24)*0x1p-24 < p {
					want[i] = 1
				}
			}
			for _, k := range sets {
				got := make([]byte, n+1)
				got[n] = 7 // not written past len(words)
				k.temperBernoulli(got, words, th)
				require.Equal(t, want, got[:n], fmt.Sprintf("%s kernels, n %d, p %v", k.name, n, p))
				require.Equal(t, byte(7), got[n])
			}
		}
	}
	// words whose tempered low 24 bits sit at the threshold and beside it
	for _, k := range sets {
		for _, th := range []uint32{0, 1, 1 << 23, 1<<24 - 1, 1 << 24} {
			words := make([]uint32, 40)
			for i := range words {
				words[i] = mtUntemper(uint32(int64(th)+int64(i%3)-1)&mtLow24 | rng.Uint32()&^mtLow24)
			}
			got := make([]byte, len(words))
			k.temperBernoulli(got, words, th)
			for i, y := range words {
				want := byte(0)
				if MT19937Temper(y)&mtLow24 < th {
					want = 1
				}
				require.Equal(t, want, got[i], "%s kernels, threshold %d, word %d", k.name, th, i)
			}
		}
	}
}

// mtUntemper inverts MT19937Temper: the steps in reverse, each undone by
// reapplying it until the shifted bits run out.
func mtUntemper(y uint32) uint32 {
	y ^= y >> mtTemperL
	y ^= (y << mtTemperT) & mtTemperC
	x := y
	for range 32 / mtTemperS {
		x = y ^ (x<<mtTemperS)&mtTemperB
	}
	y = x
	for range 32 / mtTemperU {
		x = y ^ x>>mtTemperU
	}
	return x
}

func TestMTUntemper(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	for range 1000 {
		y := rng.Uint32()
		assert.Equal(t, y, MT19937Temper(mtUntemper(y)))
	}
}

// BenchmarkMT19937 draws a state's worth of masks per iteration with each
// set this CPU runs (twist, then temper and test): ns/op / 624 is the cost
// of a word.
func BenchmarkMT19937(b *testing.B) {
	for _, k := range kernelSets {
		if len(k.missing()) > 0 {
			continue
		}
		b.Run(k.name, func(b *testing.B) {
			s := mtSeeded(1)
			dst := make([]byte, MTWords)
			b.SetBytes(MTWords)
			for b.Loop() {
				k.mtTwist(s)
				k.temperBernoulli(dst, s[:], 3355444)
			}
			b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/MTWords, "ns/word")
		})
	}
}
