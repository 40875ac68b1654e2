//go:build goexperiment.simd && amd64

package kernels

import "simd/archsimd"

// dotsAVX2 is Dots with 8-lane vectors, whose lane k adds the entries k,
// k+8, ... in order, as the portable lanes do (the AVX-512 set uses it too:
// 16 lanes would add in another order). Four rows of xs and two of zs at a
// time: eight independent sums keep the adders busy, each vector loaded
// feeds two or four products, and the rows of zs (which may not fit in the
// cache) are read once per four rows of xs.
func dotsAVX2(out, xs, zs []float32, rows, l, n int) {
	n16 := n &^ 15
	row := func(s []float32, i int) [][8]float32 { return vecs(s[i*n : i*n+n16]) }
	i := 0
	for ; i+4 <= rows; i += 4 {
		x0, x1, x2, x3 := row(xs, i), row(xs, i+1), row(xs, i+2), row(xs, i+3)
		x1, x2, x3 = x1[:len(x0)], x2[:len(x0)], x3[:len(x0)]
		c := 0
		for ; c+2 <= l; c += 2 {
			z0, z1 := row(zs, c)[:len(x0)], row(zs, c+1)[:len(x0)]
			zero := archsimd.BroadcastFloat32x8(0)
			s00, s01, s10, s11, s20, s21, s30, s31 := zero, zero, zero, zero, zero, zero, zero, zero
			for j := range x0 {
				a, b := archsimd.LoadFloat32x8(&z0[j]), archsimd.LoadFloat32x8(&z1[j])
				v := archsimd.LoadFloat32x8(&x0[j])
				s00, s01 = s00.Add(v.Mul(a)), s01.Add(v.Mul(b))
				v = archsimd.LoadFloat32x8(&x1[j])
				s10, s11 = s10.Add(v.Mul(a)), s11.Add(v.Mul(b))
				v = archsimd.LoadFloat32x8(&x2[j])
				s20, s21 = s20.Add(v.Mul(a)), s21.Add(v.Mul(b))
				v = archsimd.LoadFloat32x8(&x3[j])
				s30, s31 = s30.Add(v.Mul(a)), s31.Add(v.Mul(b))
			}
			for k, s := range [8]archsimd.Float32x8{s00, s01, s10, s11, s20, s21, s30, s31} {
				r, zc := i+k/2, c+k%2
				out[r*l+zc] = foldLanes(s, xs[r*n+n16:(r+1)*n], zs[zc*n+n16:(zc+1)*n])
			}
		}
		for ; c < l; c++ {
			for r := i; r < i+4; r++ {
				out[r*l+c] = dotAVX2(xs[r*n:(r+1)*n], zs[c*n:(c+1)*n])
			}
		}
	}
	for ; i < rows; i++ {
		for c := range l {
			out[i*l+c] = dotAVX2(xs[i*n:(i+1)*n], zs[c*n:(c+1)*n])
		}
	}
}

// dotAVX2 is one dot product of dotsAVX2 (x and y of the same length).
func dotAVX2(x, y []float32) float32 {
	n16 := len(x) &^ 15
	xv := vecs(x[:n16])
	yv := vecs(y[:n16])[:len(xv)]
	s := archsimd.BroadcastFloat32x8(0)
	for j := range xv {
		s = s.Add(archsimd.LoadFloat32x8(&xv[j]).Mul(archsimd.LoadFloat32x8(&yv[j])))
	}
	return foldLanes(s, x[n16:], y[n16:len(x)])
}

// foldLanes is foldDot of a vector of lane sums.
func foldLanes(s archsimd.Float32x8, x, y []float32) float32 {
	var lane [8]float32
	s.Store(&lane)
	return foldDot(lane, x, y)
}

// axpyRowsAVX2 is AxpyRows four rows at a time: each vector of dst is
// loaded once, the four scaled rows added in order, and stored.
func axpyRowsAVX2(dst, a []float32, xs [][]float32) {
	n8 := len(dst) &^ 7
	dv := vecs(dst[:n8])
	r := 0
	for ; r+4 <= len(xs); r += 4 {
		var x [4][][8]float32
		var w [4]archsimd.Float32x8
		for i := range x {
			x[i] = vecs(xs[r+i][:n8])[:len(dv)]
			w[i] = archsimd.BroadcastFloat32x8(a[r+i])
		}
		for j := range dv {
			d := archsimd.LoadFloat32x8(&dv[j])
			d = d.Add(archsimd.LoadFloat32x8(&x[0][j]).Mul(w[0]))
			d = d.Add(archsimd.LoadFloat32x8(&x[1][j]).Mul(w[1]))
			d = d.Add(archsimd.LoadFloat32x8(&x[2][j]).Mul(w[2]))
			d = d.Add(archsimd.LoadFloat32x8(&x[3][j]).Mul(w[3]))
			d.Store(&dv[j])
		}
		axpyTail(dst, n8, a[r:r+4], xs[r:r+4])
	}
	for ; r < len(xs); r++ {
		x := vecs(xs[r][:n8])[:len(dv)]
		w := archsimd.BroadcastFloat32x8(a[r])
		for j := range dv {
			archsimd.LoadFloat32x8(&dv[j]).Add(archsimd.LoadFloat32x8(&x[j]).Mul(w)).Store(&dv[j])
		}
		axpyTail(dst, n8, a[r:r+1], xs[r:r+1])
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
