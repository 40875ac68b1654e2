package kernels

import "math"

// GTAInto is mergekit's generalized task arithmetic on one range, into out:
// per element, with x_i = (ts[i] * scale[i]) * w[i] in float32 (each
// tensor of len(out) values at least), mixed is the sum of the x_i in
// order; with consensus only the x_i that agree with the sign of their sum
// are added (a sum >= 0 elects +1; zeros never agree) and the divisor is
// the sum of their w_i (1 when none agrees), else divisor. normalize
// divides mixed by the divisor, a lambda other than 1 scales it. out may
// be ts[0] (each element is read before it is written).
func GTAInto(out []float32, ts [][]float32, scale, w []float32, consensus, normalize bool, divisor, lambda float32) {
	active.gtaInto(out, ts, scale, w, consensus, normalize, divisor, lambda)
}

func gtaIntoGo(out []float32, ts [][]float32, scale, w []float32, consensus, normalize bool, divisor, lambda float32) {
	for e := range out {
		var mixed, div float32
		if consensus {
			var sum float32
			for i, t := range ts {
				sum += float32(t[e]*scale[i]) * w[i]
			}
			var elected uint32 // the sign bit of the elected sign: +1 for a sum >= 0
			if !(sum >= 0) {
				elected = 1 << 31
			}
			// mixed and div start at +0 and so are never -0: adding a +0 leaves them as they are
			for i, t := range ts {
				d := math.Float32bits(float32(t[e]*scale[i]) * w[i])
				agree := agreeMask(d, elected)
				mixed += math.Float32frombits(d & agree)
				div += math.Float32frombits(math.Float32bits(w[i]) & agree)
			}
			if div == 0 {
				div = 1
			}
		} else {
			for i, t := range ts {
				mixed += float32(t[e]*scale[i]) * w[i]
			}
			div = divisor
		}
		if normalize {
			mixed /= div
		}
		if lambda != 1 {
			mixed *= lambda
		}
		out[e] = mixed
	}
}

// agreeMask is all ones when the float32 of bits v is non-zero and has the
// sign bit elected (Agrees), else 0.
func agreeMask(v, elected uint32) uint32 {
	mag := v & 0x7fffffff
	nonzero := (mag | -mag) >> 31
	same := (v^elected)>>31 ^ 1
	return -(nonzero & same)
}
