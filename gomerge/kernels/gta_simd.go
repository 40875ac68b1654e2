//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"simd/archsimd"
)

// gtaIntoAVX2 is GTAInto with 8-lane vectors, a block of kernelBlock
// elements at a time and the tensors four at a time (padded with zeros,
// whose x = +0 change no sum and never agree): the sums of the block, then
// with consensus the agreeing sums and divisors, then out. Each lane does
// the portable version's operations in its order.
func gtaIntoAVX2(out []float32, ts [][]float32, scale, w []float32, consensus, normalize bool, divisor, lambda float32) {
	n8 := len(out) &^ 7
	var sumBuf, mixBuf, divBuf, zeros [kernelBlock / 8][8]float32
	type group struct {
		t    [4][][8]float32
		s, w [4]float32
	}
	gs := make([]group, (len(ts)+3)/4)
	for lo := 0; lo < n8; lo += kernelBlock {
		hi := min(lo+kernelBlock, n8)
		nv := (hi - lo) / 8
		for i := range 4 * len(gs) {
			g := &gs[i/4]
			if i < len(ts) {
				g.t[i%4], g.s[i%4], g.w[i%4] = vecs(ts[i][lo:hi]), scale[i], w[i]
			} else {
				g.t[i%4], g.s[i%4], g.w[i%4] = zeros[:nv], 0, 0
			}
		}
		sum := sumBuf[:nv]
		clear(sum)
		for _, g := range gs {
			gtaSum4(sum, g.t[0], g.t[1], g.t[2], g.t[3], g.s, g.w)
		}
		o := vecs(out[lo:hi])[:nv]
		if !consensus {
			gtaFinish(o, sum, nil, normalize, divisor, lambda)
			continue
		}
		mix, div := mixBuf[:nv], divBuf[:nv]
		clear(mix)
		clear(div)
		for _, g := range gs {
			gtaAgree4(mix, div, sum, g.t[0], g.t[1], g.t[2], g.t[3], g.s, g.w)
		}
		gtaFinish(o, mix, div, normalize, 0, lambda)
	}
	if n8 < len(out) {
		gtaIntoGo(out[n8:], tails(ts, n8), scale, w, consensus, normalize, divisor, lambda)
	}
}

// gtaSum4 adds x_a = (t_a * s[a]) * w[a] to sum, for a = 0..3 in order.
//
//go:noinline
func gtaSum4(sum, t0, t1, t2, t3 [][8]float32, s, w [4]float32) {
	t0, t1, t2, t3 = t0[:len(sum)], t1[:len(sum)], t2[:len(sum)], t3[:len(sum)]
	s0, s1, s2, s3 := archsimd.BroadcastFloat32x8(s[0]), archsimd.BroadcastFloat32x8(s[1]), archsimd.BroadcastFloat32x8(s[2]), archsimd.BroadcastFloat32x8(s[3])
	w0, w1, w2, w3 := archsimd.BroadcastFloat32x8(w[0]), archsimd.BroadcastFloat32x8(w[1]), archsimd.BroadcastFloat32x8(w[2]), archsimd.BroadcastFloat32x8(w[3])
	for j := range sum {
		v := archsimd.LoadFloat32x8(&sum[j])
		v = v.Add(archsimd.LoadFloat32x8(&t0[j]).Mul(s0).Mul(w0))
		v = v.Add(archsimd.LoadFloat32x8(&t1[j]).Mul(s1).Mul(w1))
		v = v.Add(archsimd.LoadFloat32x8(&t2[j]).Mul(s2).Mul(w2))
		v = v.Add(archsimd.LoadFloat32x8(&t3[j]).Mul(s3).Mul(w3))
		v.Store(&sum[j])
	}
}

// gtaAgree4 adds to mix the x_a that agree with the sign elected by sum
// (the elected sign bit is set where !(sum >= 0)), and their w[a] to div,
// for a = 0..3 in order.
//
//go:noinline
func gtaAgree4(mix, div, sum, t0, t1, t2, t3 [][8]float32, s, w [4]float32) {
	div, sum = div[:len(mix)], sum[:len(mix)]
	t0, t1, t2, t3 = t0[:len(mix)], t1[:len(mix)], t2[:len(mix)], t3[:len(mix)]
	s0, s1, s2, s3 := archsimd.BroadcastFloat32x8(s[0]), archsimd.BroadcastFloat32x8(s[1]), archsimd.BroadcastFloat32x8(s[2]), archsimd.BroadcastFloat32x8(s[3])
	w0, w1, w2, w3 := archsimd.BroadcastFloat32x8(w[0]), archsimd.BroadcastFloat32x8(w[1]), archsimd.BroadcastFloat32x8(w[2]), archsimd.BroadcastFloat32x8(w[3])
	zero := archsimd.BroadcastFloat32x8(0)
	signBit, izero := archsimd.BroadcastInt32x8(math.MinInt32), archsimd.BroadcastInt32x8(0)
	for j := range mix {
		e := signBit.Xor(signBit.Masked(archsimd.LoadFloat32x8(&sum[j]).GreaterEqual(zero)))
		m, d := archsimd.LoadFloat32x8(&mix[j]), archsimd.LoadFloat32x8(&div[j])
		// agrees: the bits of x xor the elected sign bit make a positive int32 (same sign, non-zero)
		x := archsimd.LoadFloat32x8(&t0[j]).Mul(s0).Mul(w0)
		a := x.AsInt32x8().Xor(e).Greater(izero)
		m, d = m.Add(x.Masked(a)), d.Add(w0.Masked(a))
		x = archsimd.LoadFloat32x8(&t1[j]).Mul(s1).Mul(w1)
		a = x.AsInt32x8().Xor(e).Greater(izero)
		m, d = m.Add(x.Masked(a)), d.Add(w1.Masked(a))
		x = archsimd.LoadFloat32x8(&t2[j]).Mul(s2).Mul(w2)
		a = x.AsInt32x8().Xor(e).Greater(izero)
		m, d = m.Add(x.Masked(a)), d.Add(w2.Masked(a))
		x = archsimd.LoadFloat32x8(&t3[j]).Mul(s3).Mul(w3)
		a = x.AsInt32x8().Xor(e).Greater(izero)
		m, d = m.Add(x.Masked(a)), d.Add(w3.Masked(a))
		m.Store(&mix[j])
		d.Store(&div[j])
	}
}

// gtaFinish writes mix (divided by div, where a divisor of 0 is 1, or by
// divisor when div is nil, with normalize; times lambda unless it is 1)
// into o.
//
//go:noinline
func gtaFinish(o, mix, div [][8]float32, normalize bool, divisor, lambda float32) {
	mix = mix[:len(o)]
	zero, one := archsimd.BroadcastFloat32x8(0), archsimd.BroadcastFloat32x8(1)
	dv, lv := archsimd.BroadcastFloat32x8(divisor), archsimd.BroadcastFloat32x8(lambda)
	if div != nil {
		div = div[:len(o)]
	}
	for j := range o {
		m := archsimd.LoadFloat32x8(&mix[j])
		if normalize {
			d := dv
			if div != nil {
				d = archsimd.LoadFloat32x8(&div[j])
				d = one.Merge(d, d.Equal(zero)) // 1 where d == 0
			}
			m = m.Div(d)
		}
		if lambda != 1 {
			m = m.Mul(lv)
		}
		m.Store(&o[j])
	}
}
