//go:build goexperiment.simd && amd64

package kernels

import (
	"simd/archsimd"
	"unsafe"
)

// dotsAVX2 is Dots with 8-lane vectors, whose lane k adds the entries k,
// k+8, ... in order, as the portable lanes do (the AVX-512 set uses it too:
// 16 lanes would add in another order). Two rows of xs and three of zs at
// a time: six independent sums keep the adders busy, each vector loaded
// feeds two or three products, and the rows of zs (which may not fit in
// the cache) are read once per two rows of xs. The rows of zs are grouped
// by their dotTrim, so that the rows of a group start their vectors at the
// same entry.
func dotsAVX2(out, xs, zs []float32, rows, l, n int) {
	var byTrim [4][]int
	for c := range l {
		t := dotTrim(zs[c*n : (c+1)*n])
		byTrim[t] = append(byTrim[t], c)
	}
	var lanes [6][8]float32
	// start sets lanes[k] to the trimmed entries' sum (lane 0) of row i and row c
	start := func(k, i, c, t int) {
		lanes[k] = [8]float32{}
		x, z := xs[i*n:i*n+t], zs[c*n:c*n+t]
		for j := range x {
			lanes[k][0] += float32(x[j] * z[j])
		}
	}
	fold := func(k, i, c, t int) {
		n16 := (n - t) &^ 15
		out[i*l+c] = foldDot(lanes[k], xs[i*n+t+n16:(i+1)*n], zs[c*n+t+n16:(c+1)*n])
	}
	row := func(s []float32, i, t int) [][8]float32 { return vecs(s[i*n+t : i*n+t+(n-t)&^15]) }
	for i := 0; i < rows; i += 2 {
		i1 := min(i+1, rows-1) // a last single row is computed twice, stored once
		for t, cs := range byTrim {
			if len(cs) == 0 {
				continue
			}
			x0, x1 := row(xs, i, t), row(xs, i1, t)
			k := 0
			for ; k+3 <= len(cs); k += 3 {
				for a := range 2 {
					for b := range 3 {
						start(3*a+b, []int{i, i1}[a], cs[k+b], t)
					}
				}
				dots2x3(&lanes, x0, x1, row(zs, cs[k], t), row(zs, cs[k+1], t), row(zs, cs[k+2], t))
				for b := range 3 {
					fold(b, i, cs[k+b], t)
					if i1 != i {
						fold(3+b, i1, cs[k+b], t)
					}
				}
			}
			for ; k < len(cs); k++ {
				start(0, i, cs[k], t)
				start(1, i1, cs[k], t)
				dots2x1(&lanes, x0, x1, row(zs, cs[k], t))
				fold(0, i, cs[k], t)
				if i1 != i {
					fold(1, i1, cs[k], t)
				}
			}
		}
	}
}

// dots2x3 adds to lanes the 8-lane sums of the products of x0 and x1 with
// z0, z1 and z2 (all of the length of x0): lanes[3*a+b] for x_a and z_b. A
// function of its own, so that its loop keeps every sum and index in
// registers.
//
//go:noinline
func dots2x3(lanes *[6][8]float32, x0, x1, z0, z1, z2 [][8]float32) {
	x1, z0, z1, z2 = x1[:len(x0)], z0[:len(x0)], z1[:len(x0)], z2[:len(x0)]
	s0, s1, s2 := archsimd.LoadFloat32x8(&lanes[0]), archsimd.LoadFloat32x8(&lanes[1]), archsimd.LoadFloat32x8(&lanes[2])
	s3, s4, s5 := archsimd.LoadFloat32x8(&lanes[3]), archsimd.LoadFloat32x8(&lanes[4]), archsimd.LoadFloat32x8(&lanes[5])
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

// dots2x1 is dots2x3 with one row of zs: lanes[0] and lanes[1].
//
//go:noinline
func dots2x1(lanes *[6][8]float32, x0, x1, z0 [][8]float32) {
	x1, z0 = x1[:len(x0)], z0[:len(x0)]
	s0, s1 := archsimd.LoadFloat32x8(&lanes[0]), archsimd.LoadFloat32x8(&lanes[1])
	for j := range x0 {
		z := archsimd.LoadFloat32x8(&z0[j])
		s0 = s0.Add(archsimd.LoadFloat32x8(&x0[j]).Mul(z))
		s1 = s1.Add(archsimd.LoadFloat32x8(&x1[j]).Mul(z))
	}
	s0.Store(&lanes[0])
	s1.Store(&lanes[1])
}

// axpyRowsAVX2 is AxpyRows four rows at a time: each vector of dst is
// loaded once, the four scaled rows added in order, and stored.
func axpyRowsAVX2(dst, a []float32, xs [][]float32) {
	rowsAVX2(dst, a, xs, false, 1)
}

// denseRowAVX2 is DenseRow: rowsAVX2 from zero, then scaled.
func denseRowAVX2(dst, a []float32, xs [][]float32, s float32) {
	if s == 0 {
		clear(dst)
		return
	}
	rowsAVX2(dst, a, xs, true, s)
}

// rowsAVX2 adds a[r] xs[r] to dst (to +0 with fresh), in order, four rows
// per pass over dst, then multiplies by s (unless it is 1) in the last.
func rowsAVX2(dst, a []float32, xs [][]float32, fresh bool, s float32) {
	n8 := len(dst) &^ 7
	dv := vecs(dst[:n8])
	x := func(r int) [][8]float32 { return vecs(xs[r][:n8]) }
	if len(xs) == 0 {
		if fresh {
			clear(dst)
		}
		if s != 1 {
			for j := range dst {
				dst[j] *= s
			}
		}
		return
	}
	for r := 0; r < len(xs); {
		k := 1
		if len(xs)-r >= 4 {
			k = 4
		}
		first, last := fresh && r == 0, r+k == len(xs) && s != 1
		if k == 4 {
			axpy4(dv, x(r), x(r+1), x(r+2), x(r+3), a[r], a[r+1], a[r+2], a[r+3], first, last, s)
		} else {
			axpy1(dv, x(r), a[r], first, last, s)
		}
		for j := n8; j < len(dst); j++ {
			v := dst[j]
			if first {
				v = 0
			}
			for i := r; i < r+k; i++ {
				v += float32(a[i] * xs[i][j])
			}
			if last {
				v *= s
			}
			dst[j] = v
		}
		r += k
	}
}

// axpy4 adds a0 x0, a1 x1, a2 x2 and a3 x3 to d (to +0 with first), in
// this order, then multiplies by s with last. A function of its own, so
// that its loop keeps everything in registers.
//
//go:noinline
func axpy4(d, x0, x1, x2, x3 [][8]float32, a0, a1, a2, a3 float32, first, last bool, s float32) {
	x0, x1, x2, x3 = x0[:len(d)], x1[:len(d)], x2[:len(d)], x3[:len(d)]
	w0, w1 := archsimd.BroadcastFloat32x8(a0), archsimd.BroadcastFloat32x8(a1)
	w2, w3 := archsimd.BroadcastFloat32x8(a2), archsimd.BroadcastFloat32x8(a3)
	zero, sv := archsimd.BroadcastFloat32x8(0), archsimd.BroadcastFloat32x8(s)
	for j := range d {
		v := zero
		if !first {
			v = archsimd.LoadFloat32x8(&d[j])
		}
		v = v.Add(archsimd.LoadFloat32x8(&x0[j]).Mul(w0))
		v = v.Add(archsimd.LoadFloat32x8(&x1[j]).Mul(w1))
		v = v.Add(archsimd.LoadFloat32x8(&x2[j]).Mul(w2))
		v = v.Add(archsimd.LoadFloat32x8(&x3[j]).Mul(w3))
		if last {
			v = v.Mul(sv)
		}
		v.Store(&d[j])
	}
}

// axpy1 is axpy4 with one row.
//
//go:noinline
func axpy1(d, x0 [][8]float32, a0 float32, first, last bool, s float32) {
	x0 = x0[:len(d)]
	w0 := archsimd.BroadcastFloat32x8(a0)
	zero, sv := archsimd.BroadcastFloat32x8(0), archsimd.BroadcastFloat32x8(s)
	for j := range d {
		v := zero
		if !first {
			v = archsimd.LoadFloat32x8(&d[j])
		}
		v = v.Add(archsimd.LoadFloat32x8(&x0[j]).Mul(w0))
		if last {
			v = v.Mul(sv)
		}
		v.Store(&d[j])
	}
}

// magnitudeRankAVX2 is MagnitudeRank as the count of the entries below
// mag[c] (signed compares: the values are below 2^31) and of the equal ones
// before it, eight at a time.
func magnitudeRankAVX2(mag []uint32, c int) int {
	m := int32(mag[c])
	n8, c8 := len(mag)&^7, c&^7
	rank := 0
	if n8 > 0 { // a vector view needs a whole vector (no pointer past the data)
		v := unsafe.Slice((*[8]int32)(unsafe.Pointer(unsafe.SliceData(mag))), n8/8)
		rank = int(rankCount(v, v[:c8/8], m))
	}
	for _, x := range mag[n8:] {
		if int32(x) < m {
			rank++
		}
	}
	for _, x := range mag[c8:c] {
		if int32(x) == m {
			rank++
		}
	}
	return rank
}

// rankCount counts the lanes of all below m and those of prefix equal to m.
//
//go:noinline
func rankCount(all, prefix [][8]int32, m int32) int32 {
	mv := archsimd.BroadcastInt32x8(m)
	acc := archsimd.BroadcastInt32x8(0)
	for j := range all {
		acc = acc.Sub(mv.Greater(archsimd.LoadInt32x8(&all[j])).ToInt32x8()) // -1 where below
	}
	for j := range prefix {
		acc = acc.Sub(archsimd.LoadInt32x8(&prefix[j]).Equal(mv).ToInt32x8())
	}
	var lanes [8]int32
	acc.Store(&lanes)
	var sum int32
	for _, l := range lanes {
		sum += l
	}
	return sum
}

// mulTIntoAVX2 is MulTInto on tiles of 16 columns of part and 4 of its
// rows, held in eight 8-lane sums while all the rows of D are added (the
// 16 columns of D, one cache line per row, are read once per 4 rows of
// part); the last columns (n % 16) in the portable order.
func mulTIntoAVX2(part, d, y []float32, rows, n, l int) {
	n16 := n &^ 15
	var acc [8][8]float32
	for j := 0; j < n16; j += 16 {
		for c := 0; c < l; c += 4 {
			var cs [4]int
			for k := range cs {
				cs[k] = min(c+k, l-1) // a group past the last row of part repeats it, unstored
			}
			for k, ck := range cs {
				copy(acc[2*k][:], part[ck*n+j:ck*n+j+8])
				copy(acc[2*k+1][:], part[ck*n+j+8:ck*n+j+16])
			}
			mulT4x2(&acc, d[j:], y, rows, n, l, cs)
			for k, ck := range cs[:min(4, l-c)] {
				copy(part[ck*n+j:ck*n+j+8], acc[2*k][:])
				copy(part[ck*n+j+8:ck*n+j+16], acc[2*k+1][:])
			}
		}
	}
	if n16 < n {
		for i := range rows {
			for c := range l {
				a := y[i*l+c]
				for j := n16; j < n; j++ {
					part[c*n+j] += float32(a * d[i*n+j])
				}
			}
		}
	}
}

// mulT4x2 adds, for each row i < rows of d (stride n, from its first 16
// entries), y[i*l+cs[k]] * d[i][0:16] to acc[2k] and acc[2k+1].
//
//go:noinline
func mulT4x2(acc *[8][8]float32, d, y []float32, rows, n, l int, cs [4]int) {
	s0, s1 := archsimd.LoadFloat32x8(&acc[0]), archsimd.LoadFloat32x8(&acc[1])
	s2, s3 := archsimd.LoadFloat32x8(&acc[2]), archsimd.LoadFloat32x8(&acc[3])
	s4, s5 := archsimd.LoadFloat32x8(&acc[4]), archsimd.LoadFloat32x8(&acc[5])
	s6, s7 := archsimd.LoadFloat32x8(&acc[6]), archsimd.LoadFloat32x8(&acc[7])
	c0, c1, c2, c3 := cs[0], cs[1], cs[2], cs[3]
	for i := range rows {
		x := (*[16]float32)(d[i*n : i*n+16])
		yi := y[i*l : (i+1)*l]
		x0, x1 := archsimd.LoadFloat32x8((*[8]float32)(x[:8])), archsimd.LoadFloat32x8((*[8]float32)(x[8:]))
		w := archsimd.BroadcastFloat32x8(yi[c0])
		s0, s1 = s0.Add(x0.Mul(w)), s1.Add(x1.Mul(w))
		w = archsimd.BroadcastFloat32x8(yi[c1])
		s2, s3 = s2.Add(x0.Mul(w)), s3.Add(x1.Mul(w))
		w = archsimd.BroadcastFloat32x8(yi[c2])
		s4, s5 = s4.Add(x0.Mul(w)), s5.Add(x1.Mul(w))
		w = archsimd.BroadcastFloat32x8(yi[c3])
		s6, s7 = s6.Add(x0.Mul(w)), s7.Add(x1.Mul(w))
	}
	s0.Store(&acc[0])
	s1.Store(&acc[1])
	s2.Store(&acc[2])
	s3.Store(&acc[3])
	s4.Store(&acc[4])
	s5.Store(&acc[5])
	s6.Store(&acc[6])
	s7.Store(&acc[7])
}
