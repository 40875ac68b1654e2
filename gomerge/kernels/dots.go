package kernels

import "unsafe"

// The dense products of the randomized SVD (gomerge's rsvd.go): dot
// products of one row with several others, and several scaled rows added
// to one. Every product is rounded to float32 before it is added (no fused
// multiply-add), so that each set gives the same bits.

// Dots writes into out[i*l+c] (out is rows x l) the dot product of row i of
// xs with row c of zs (rows of n values, one after the other). The order
// of the additions is gonum's f32.DotUnitary (SSE): the first entries up to
// the first 16-byte aligned one of the zs row (dotTrim) into lane 0, then
// eight lane sums over the next whole groups of 16 entries (lane k takes
// entries k, k+8, k+16, ... of them), folded to four (k + (k+4)), then the
// next whole groups of four entries lane-wise, the last ones into lane 0,
// and (s0 + s1) + (s2 + s3).
func Dots(out, xs, zs []float32, rows, l, n int) { active.dots(out, xs, zs, rows, l, n) }

// AxpyRows adds a[r] * xs[r] (rounded to float32) to dst, for each r in
// order: dst[j] = ((dst[j] + a[0]*xs[0][j]) + a[1]*xs[1][j]) + ..., each
// xs[r] of len(dst) values at least: gonum's Saxpy called once per row.
func AxpyRows(dst, a []float32, xs [][]float32) { active.axpyRows(dst, a, xs) }

// DenseRow writes into dst the sum of a[r] * xs[r] (rounded to float32)
// from +0, added in order, times s: the bits of a cleared dst, AxpyRows,
// then gonum's Sscal by s (which writes +0 everywhere for an s of 0).
func DenseRow(dst, a []float32, xs [][]float32, s float32) { active.denseRow(dst, a, xs, s) }

func dotsGo(out, xs, zs []float32, rows, l, n int) {
	for i := range rows {
		x := xs[i*n : (i+1)*n]
		for c := range l {
			out[i*l+c] = dotGo(x, zs[c*n:(c+1)*n])
		}
	}
}

// dotGo is one dot product of Dots.
func dotGo(x, y []float32) float32 {
	y = y[:len(x)]
	var lane [8]float32
	t := dotTrim(y)
	for j := range t {
		lane[0] += float32(x[j] * y[j])
	}
	x, y = x[t:], y[t:]
	n16 := len(x) &^ 15
	for j := 0; j < n16; j += 8 {
		for k := range lane {
			lane[k] += float32(x[j+k] * y[j+k])
		}
	}
	return foldDot(lane, x[n16:], y[n16:])
}

// dotTrim is how many entries of y precede its first 16-byte aligned one
// (at most len(y)), which gonum's dot product adds one by one first.
func dotTrim(y []float32) int {
	if len(y) == 0 {
		return 0
	}
	a := int(uintptr(unsafe.Pointer(unsafe.SliceData(y))) % 16)
	if a == 0 {
		return 0
	}
	return min((16-a)/4, len(y))
}

// foldDot folds the eight lane sums of a dot product and adds the entries
// after them (x and y: the last n%16).
func foldDot(lane [8]float32, x, y []float32) float32 {
	var s [4]float32
	for k := range s {
		s[k] = lane[k] + lane[k+4]
	}
	j := 0
	for ; j+4 <= len(x); j += 4 {
		for k := range s {
			s[k] += float32(x[j+k] * y[j+k])
		}
	}
	for ; j < len(x); j++ {
		s[0] += float32(x[j] * y[j])
	}
	return (s[0] + s[1]) + (s[2] + s[3])
}

func denseRowGo(dst, a []float32, xs [][]float32, s float32) {
	clear(dst)
	if s == 0 {
		return
	}
	axpyRowsGo(dst, a, xs)
	for j := range dst {
		dst[j] *= s
	}
}

func axpyRowsGo(dst, a []float32, xs [][]float32) {
	for r, x := range xs {
		x = x[:len(dst)]
		ar := a[r]
		for j, v := range x {
			dst[j] += float32(ar * v)
		}
	}
}

// MagnitudeRank is the 0-based rank of mag[c] among mag in ascending
// order, equal values in index order: the entries below it, and the equal
// ones before it. The values are float32 magnitude bits (below 2^31).
func MagnitudeRank(mag []uint32, c int) int { return active.magnitudeRank(mag, c) }

func magnitudeRankGo(mag []uint32, c int) int {
	m := mag[c]
	rank := 0
	for _, x := range mag[:c] {
		if x <= m {
			rank++
		}
	}
	for _, x := range mag[c+1:] {
		if x < m {
			rank++
		}
	}
	return rank
}

// MulTInto adds Y^T D to part (l x n): for each row i of D (rows x n) in
// order, y[i*l+c] * D[i] (rounded to float32) is added to row c of part,
// for every c. Every coefficient must be non-zero: the sums are then
// AxpyRows' (one Saxpy per row and column, which skips zero coefficients).
func MulTInto(part, d, y []float32, rows, n, l int) { active.mulTInto(part, d, y, rows, n, l) }

func mulTIntoGo(part, d, y []float32, rows, n, l int) {
	for i := range rows {
		x := d[i*n : (i+1)*n]
		for c := range l {
			a := y[i*l+c]
			dst := part[c*n : (c+1)*n]
			for j, v := range x {
				dst[j] += float32(a * v)
			}
		}
	}
}
