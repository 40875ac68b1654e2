package kernels

// MTWords is the number of 32-bit words of the Mersenne Twister's state
// (std::mt19937, and torch's CPU generator at::mt19937).
const MTWords = 624

const (
	mtShift   = 397
	mtMatrixA = 0x9908b0df
	mtUpper   = 0x80000000
	mtLower   = 0x7fffffff
	// the tempering's shifts and masks
	mtTemperU = 11
	mtTemperS = 7
	mtTemperB = 0x9d2c5680
	mtTemperT = 15
	mtTemperC = 0xefc60000
	mtTemperL = 18
	// mtLow24 keeps the 24 bits that torch.bernoulli's float draw uses
	mtLow24 = 0xFFFFFF
)

// MT19937Twist regenerates the Mersenne Twister's state in place: word i
// becomes state[i+397] ^ twist(state[i], state[i+1]), indices modulo 624,
// in order (so that words from i = 227 on read words already regenerated).
func MT19937Twist(state *[MTWords]uint32) { active.mtTwist(state) }

// TemperBernoulli is torch.bernoulli's keep test on words of the twisted
// state: dst[i] (dst holds len(words) bytes at least) is 1 when the low 24
// bits of the tempered words[i] are below t, else 0 (t is at most 2**24; for
// a probability p, t = ceil(p * 2**24)).
func TemperBernoulli(dst []byte, words []uint32, t uint32) { active.temperBernoulli(dst, words, t) }

// MT19937Temper is the Mersenne Twister's tempering of a state word (the
// generator's output).
func MT19937Temper(y uint32) uint32 {
	y ^= y >> mtTemperU
	y ^= (y << mtTemperS) & mtTemperB
	y ^= (y << mtTemperT) & mtTemperC
	return y ^ y>>mtTemperL
}

// mtMix regenerates state word i from words i, j = i+1 and k = i+397
// (modulo 624), without a branch.
func mtMix(s *[MTWords]uint32, i, j, k int) {
	y := s[i]&mtUpper | s[j]&mtLower
	s[i] = s[k] ^ y>>1 ^ (-(y & 1) & mtMatrixA)
}

// mtTwistGo twists in the three ranges where the indices i+1 and i+397 do
// not wrap around.
func mtTwistGo(s *[MTWords]uint32) {
	i := 0
	for ; i < MTWords-mtShift; i++ {
		mtMix(s, i, i+1, i+mtShift)
	}
	for ; i < MTWords-1; i++ {
		mtMix(s, i, i+1, i+mtShift-MTWords)
	}
	mtMix(s, MTWords-1, 0, mtShift-1)
}

func temperBernoulliGo(dst []byte, words []uint32, t uint32) {
	out := dst[:len(words)]
	for i, y := range words {
		// x < t as the sign of x - t (both below 2**25): no branch to mispredict
		out[i] = byte((MT19937Temper(y)&mtLow24 - t) >> 31)
	}
}
