package torchrng

import (
	"fmt"
	"math"

	"gomerge/gomerge/kernels"
)

// StateWords is the number of 32-bit words of the Mersenne Twister's state.
const StateWords = kernels.MTWords

// MT19937 is the 32-bit Mersenne Twister as at::mt19937 runs it. State is
// the twisted state; Pos the index of the next word to temper, StateWords
// when the state must be twisted first (torch's left_ is 625 - Pos).
type MT19937 struct {
	State [StateWords]uint32
	Pos   int
}

// Seeded is the generator of torch.manual_seed(seed) (and of
// std::mt19937(seed), whose outputs at::mt19937 matches).
func Seeded(seed uint64) *MT19937 {
	g := &MT19937{Pos: StateWords}
	g.State[0] = uint32(seed)
	for j := 1; j < StateWords; j++ {
		prev := g.State[j-1]
		g.State[j] = 1812433253*(prev^(prev>>30)) + uint32(j)
	}
	return g
}

// Check reports a position outside [0, StateWords].
func (g *MT19937) Check() error {
	if g.Pos < 0 || g.Pos > StateWords {
		return fmt.Errorf("mt19937 position %d is outside [0, %d]", g.Pos, StateWords)
	}
	return nil
}

// twist is the Mersenne Twister's state transition, by the kernel set in
// use (vector lanes where the CPU has them; the same bits).
func (g *MT19937) twist() {
	kernels.MT19937Twist(&g.State)
	g.Pos = 0
}

// Uint32 is the next word (torch's generator->random()).
func (g *MT19937) Uint32() uint32 {
	if g.Pos >= StateWords {
		g.twist()
	}
	y := g.State[g.Pos]
	g.Pos++
	return kernels.MT19937Temper(y)
}

// BernoulliThreshold is the bound that torch.bernoulli's test of a 24-bit
// word x against probability p reduces to: x * 2**-24 < p exactly when
// x < BernoulliThreshold(p) (p is a float32; x * 2**-24 is exact).
func BernoulliThreshold(p float32) (uint32, error) {
	if !(p >= 0 && p <= 1) {
		return 0, fmt.Errorf("probability %v is outside [0, 1]", p)
	}
	return uint32(math.Ceil(float64(p) * (1 << 24))), nil
}

// Bernoulli fills dst as torch.bernoulli with probability p (float32,
// bfloat16 or float16 probability tensors, given as their float32 value)
// fills a tensor of len(dst) elements in memory order: 1 where the element
// is kept, 0 elsewhere.
func (g *MT19937) Bernoulli(dst []byte, p float32) error {
	t, err := BernoulliThreshold(p)
	if err != nil {
		return err
	}
	for len(dst) > 0 {
		if g.Pos >= StateWords {
			g.twist()
		}
		words := g.State[g.Pos:]
		k := min(len(words), len(dst))
		kernels.TemperBernoulli(dst[:k], words[:k], t)
		g.Pos += k
		dst = dst[k:]
	}
	return nil
}
