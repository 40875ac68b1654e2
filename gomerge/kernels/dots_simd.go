//go:build goexperiment.simd && amd64

package kernels

import "simd/archsimd"

// dotsAVX2 is Dots with 8-lane vectors, whose lane k adds the entries k,
// k+8, ... in order, as the portable lanes do (the AVX-512 set uses it too:
// 16 lanes would add in another order). Two rows of xs and three of zs at
// a time: six independent sums keep the adders busy, each vector loaded
// feeds two or three products, and the rows of zs (which may not fit in
// the cache) are read once per two rows of xs.
func dotsAVX2(out, xs, zs []float32, rows, l, n int) {
	n16 := n &^ 15
	row := func(s []float32, i int) [][8]float32 { return vecs(s[i*n : i*n+n16]) }
	fold := func(lane *[8]float32, i, c int) {
		out[i*l+c] = foldDot(*lane, xs[i*n+n16:(i+1)*n], zs[c*n+n16:(c+1)*n])
	}
	var lanes [6][8]float32
	i := 0
	for ; i+2 <= rows; i += 2 {
		x0, x1 := row(xs, i), row(xs, i+1)
		c := 0
		for ; c+3 <= l; c += 3 {
			dots2x3(&lanes, x0, x1, row(zs, c), row(zs, c+1), row(zs, c+2))
			for k := range 6 {
				fold(&lanes[k], i+k/3, c+k%3)
			}
		}
		for ; c < l; c++ {
			dots2x1(&lanes, x0, x1, row(zs, c))
			fold(&lanes[0], i, c)
			fold(&lanes[1], i+1, c)
		}
	}
	for ; i < rows; i++ {
		x0 := row(xs, i)
		for c := range l {
			dots2x1(&lanes, x0, x0, row(zs, c))
			fold(&lanes[0], i, c)
		}
	}
}

// dots2x1 is dots2x3 with one row of zs: lanes[0] and lanes[1].
//
//go:noinline
func dots2x1(lanes *[6][8]float32, x0, x1, z0 [][8]float32) {
	x1, z0 = x1[:len(x0)], z0[:len(x0)]
	s0 := archsimd.BroadcastFloat32x8(0)
	s1 := s0
	for j := range x0 {
		z := archsimd.LoadFloat32x8(&z0[j])
		s0 = s0.Add(archsimd.LoadFloat32x8(&x0[j]).Mul(z))
		s1 = s1.Add(archsimd.LoadFloat32x8(&x1[j]).Mul(z))
	}
	s0.Store(&lanes[0])
	s1.Store(&lanes[1])
}

// dots2x3 writes into lanes the 8-lane sums of the products of x0 and x1
// with z0, z1 and z2 (all of the length of x0): lanes[3*a+b] for x_a and
// z_b. A function of its own, so that its loop keeps every sum and index
// in registers.
//
//go:noinline
func dots2x3(lanes *[6][8]float32, x0, x1, z0, z1, z2 [][8]float32) {
	x1, z0, z1, z2 = x1[:len(x0)], z0[:len(x0)], z1[:len(x0)], z2[:len(x0)]
	s0 := archsimd.BroadcastFloat32x8(0)
	s1, s2, s3, s4, s5 := s0, s0, s0, s0, s0
	for j := range x0 {
		a, b := archsimd.LoadFloat32x8(&x0[j]), archsimd.LoadFloat32x8(&x1[j])
		z := archsimd.LoadFloat32x8(&z0[j])
		s0, s3 = s0.Add(a.Mul(z)), s3.Add(b.Mul(z))
		z = archsimd.LoadFloat32x8(&z1[j])
		s1, s4 = s1.Add(a.Mul(z)), s4.Add(b.Mul(z))
		z = archsimd.LoadFloat32x8(&z2[j])
		s2, s5 = s2.Add(a.Mul(z)), s5.Add(b.Mul(z))
	}
	s0.Store(&lanes[0])
	s1.Store(&lanes[1])
	s2.Store(&lanes[2])
	s3.Store(&lanes[3])
	s4.Store(&lanes[4])
	s5.Store(&lanes[5])
}

// axpyRowsAVX2 is AxpyRows four rows at a time: each vector of dst is
// loaded once, the four scaled rows added in order, and stored.
func axpyRowsAVX2(dst, a []float32, xs [][]float32) {
	n8 := len(dst) &^ 7
	dv := vecs(dst[:n8])
	x := func(r int) [][8]float32 { return vecs(xs[r][:n8]) }
	r := 0
	for ; r+4 <= len(xs); r += 4 {
		axpy4(dv, x(r), x(r+1), x(r+2), x(r+3), a[r], a[r+1], a[r+2], a[r+3])
		axpyTail(dst, n8, a[r:r+4], xs[r:r+4])
	}
	for ; r < len(xs); r++ {
		axpy1(dv, x(r), a[r])
		axpyTail(dst, n8, a[r:r+1], xs[r:r+1])
	}
}

// axpy4 adds a0 x0, a1 x1, a2 x2 and a3 x3 to d, in this order. A function
// of its own, so that its loop keeps everything in registers.
//
//go:noinline
func axpy4(d, x0, x1, x2, x3 [][8]float32, a0, a1, a2, a3 float32) {
	x0, x1, x2, x3 = x0[:len(d)], x1[:len(d)], x2[:len(d)], x3[:len(d)]
	w0, w1 := archsimd.BroadcastFloat32x8(a0), archsimd.BroadcastFloat32x8(a1)
	w2, w3 := archsimd.BroadcastFloat32x8(a2), archsimd.BroadcastFloat32x8(a3)
	for j := range d {
		v := archsimd.LoadFloat32x8(&d[j])
		v = v.Add(archsimd.LoadFloat32x8(&x0[j]).Mul(w0))
		v = v.Add(archsimd.LoadFloat32x8(&x1[j]).Mul(w1))
		v = v.Add(archsimd.LoadFloat32x8(&x2[j]).Mul(w2))
		v = v.Add(archsimd.LoadFloat32x8(&x3[j]).Mul(w3))
		v.Store(&d[j])
	}
}

// axpy1 adds a0 x0 to d.
//
//go:noinline
func axpy1(d, x0 [][8]float32, a0 float32) {
	x0 = x0[:len(d)]
	w0 := archsimd.BroadcastFloat32x8(a0)
	for j := range d {
		archsimd.LoadFloat32x8(&d[j]).Add(archsimd.LoadFloat32x8(&x0[j]).Mul(w0)).Store(&d[j])
	}
}

// axpyTail is axpyRowsGo on the entries from j0 of dst (without slicing xs
// anew).
func axpyTail(dst []float32, j0 int, a []float32, xs [][]float32) {
	for r, x := range xs {
		for j := j0; j < len(dst); j++ {
			dst[j] += float32(a[r] * x[j])
		}
	}
}
