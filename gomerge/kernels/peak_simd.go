//go:build goexperiment.simd && amd64

package kernels

import "simd/archsimd"

// The vector sets' peak loops (peak.go): 12 chains of vector multiply-adds
// c = c*a + a (VFMADD213 writes its result over the receiver c: no register
// copies).
func init() {
	peakLoops["avx2"] = [2]peakLoop{peak32AVX2, peak64AVX2}
	peakLoops["avx512"] = [2]peakLoop{peak32512, peak64512}
}

//go:noinline
func peak32AVX2(iters int) (float64, float64) {
	a := archsimd.BroadcastFloat32x8(1e-3)
	var c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 archsimd.Float32x8
	for range iters {
		c0, c1, c2, c3 = c0.MulAdd(a, a), c1.MulAdd(a, a), c2.MulAdd(a, a), c3.MulAdd(a, a)
		c4, c5, c6, c7 = c4.MulAdd(a, a), c5.MulAdd(a, a), c6.MulAdd(a, a), c7.MulAdd(a, a)
		c8, c9, c10, c11 = c8.MulAdd(a, a), c9.MulAdd(a, a), c10.MulAdd(a, a), c11.MulAdd(a, a)
	}
	var out [8]float32
	s := c0.Add(c1).Add(c2).Add(c3).Add(c4).Add(c5).Add(c6).Add(c7).Add(c8).Add(c9).Add(c10).Add(c11)
	s.Store(&out)
	return 2 * 12 * 8 * float64(iters), float64(out[0])
}

//go:noinline
func peak64AVX2(iters int) (float64, float64) {
	a := archsimd.BroadcastFloat64x4(1e-3)
	var c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 archsimd.Float64x4
	for range iters {
		c0, c1, c2, c3 = c0.MulAdd(a, a), c1.MulAdd(a, a), c2.MulAdd(a, a), c3.MulAdd(a, a)
		c4, c5, c6, c7 = c4.MulAdd(a, a), c5.MulAdd(a, a), c6.MulAdd(a, a), c7.MulAdd(a, a)
		c8, c9, c10, c11 = c8.MulAdd(a, a), c9.MulAdd(a, a), c10.MulAdd(a, a), c11.MulAdd(a, a)
	}
	var out [4]float64
	s := c0.Add(c1).Add(c2).Add(c3).Add(c4).Add(c5).Add(c6).Add(c7).Add(c8).Add(c9).Add(c10).Add(c11)
	s.Store(&out)
	return 2 * 12 * 4 * float64(iters), out[0]
}

//go:noinline
func peak32512(iters int) (float64, float64) {
	a := archsimd.BroadcastFloat32x16(1e-3)
	var c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 archsimd.Float32x16
	for range iters {
		c0, c1, c2, c3 = c0.MulAdd(a, a), c1.MulAdd(a, a), c2.MulAdd(a, a), c3.MulAdd(a, a)
		c4, c5, c6, c7 = c4.MulAdd(a, a), c5.MulAdd(a, a), c6.MulAdd(a, a), c7.MulAdd(a, a)
		c8, c9, c10, c11 = c8.MulAdd(a, a), c9.MulAdd(a, a), c10.MulAdd(a, a), c11.MulAdd(a, a)
	}
	var out [16]float32
	s := c0.Add(c1).Add(c2).Add(c3).Add(c4).Add(c5).Add(c6).Add(c7).Add(c8).Add(c9).Add(c10).Add(c11)
	s.Store(&out)
	return 2 * 12 * 16 * float64(iters), float64(out[0])
}

//go:noinline
func peak64512(iters int) (float64, float64) {
	a := archsimd.BroadcastFloat64x8(1e-3)
	var c0, c1, c2, c3, c4, c5, c6, c7, c8, c9, c10, c11 archsimd.Float64x8
	for range iters {
		c0, c1, c2, c3 = c0.MulAdd(a, a), c1.MulAdd(a, a), c2.MulAdd(a, a), c3.MulAdd(a, a)
		c4, c5, c6, c7 = c4.MulAdd(a, a), c5.MulAdd(a, a), c6.MulAdd(a, a), c7.MulAdd(a, a)
		c8, c9, c10, c11 = c8.MulAdd(a, a), c9.MulAdd(a, a), c10.MulAdd(a, a), c11.MulAdd(a, a)
	}
	var out [8]float64
	s := c0.Add(c1).Add(c2).Add(c3).Add(c4).Add(c5).Add(c6).Add(c7).Add(c8).Add(c9).Add(c10).Add(c11)
	s.Store(&out)
	return 2 * 12 * 8 * float64(iters), out[0]
}
