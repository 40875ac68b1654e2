package torchrng

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The C++ standard's check of std::mt19937 (whose outputs at::mt19937
// matches): the 10000th output of the default seed 5489 is 4123659995.
func TestSeededMatchesStdMT19937(t *testing.T) {
	g := Seeded(5489)
	assert.Equal(t, uint32(3499211612), g.Uint32())
	var y uint32
	for i := 1; i < 10000; i++ {
		y = g.Uint32()
	}
	assert.Equal(t, uint32(4123659995), y)
}

func TestBernoulliFollowsTheWords(t *testing.T) {
	for _, tc := range []struct {
		name string
		p    float32
		n    int
	}{
		{"float32 0.2 across twists", 0.2, 3*StateWords + 17},
		{"zero", 0, 1000},
		{"one", 1, 1000},
		{"bfloat16 0.2", 0.2001953125, 700},
		{"exact threshold", 0.5, 2000},
	} {
		t.Run(tc.name, func(t *testing.T) {
			g, ref := Seeded(7), Seeded(7)
			ref.Uint32() // the stream may start anywhere: here one word in
			g.Uint32()
			dst := make([]byte, tc.n)
			require.NoError(t, g.Bernoulli(dst, tc.p))
			for i := range dst {
				x := float32(ref.Uint32()&0xFFFFFF) * (1.0 / (1 << 24))
				want := byte(0)
				if x < tc.p {
					want = 1
				}
				require.Equal(t, want, dst[i], "element %d", i)
			}
			assert.Equal(t, ref.Pos, g.Pos)
			assert.Equal(t, ref.State, g.State)
		})
	}
}

func TestBernoulliRefusesABadProbability(t *testing.T) {
	for _, p := range []float32{-0.1, 1.5} {
		_, err := BernoulliThreshold(p)
		assert.Error(t, err, p)
	}
}

func TestCheckPosition(t *testing.T) {
	assert.NoError(t, (&MT19937{Pos: StateWords}).Check())
	assert.Error(t, (&MT19937{Pos: StateWords + 1}).Check())
	assert.Error(t, (&MT19937{Pos: -1}).Check())
}

func BenchmarkBernoulli(b *testing.B) {
	g := Seeded(1)
	dst := make([]byte, 1<<20)
	b.SetBytes(int64(len(dst)))
	for b.Loop() {
		_ = g.Bernoulli(dst, 0.2)
	}
}
