package kernels

import "math"

// The kernel of a fuse (package fuse): the rows of W + s B A, summed in
// float64 and rounded once.

// Rounding names the dtype that a fused float32 result is rounded to next:
// LowRankRows keeps its float32 values off that dtype's rounding midpoints
// (ToFloat32For), so that the second rounding is the one rounding of the
// exact sum.
type Rounding uint8

const (
	// RoundF32 is a float32 result kept as it is.
	RoundF32 Rounding = iota
	// RoundBF16 is a float32 result rounded to BF16 next.
	RoundBF16
	// RoundF16 is a float32 result rounded to F16 next.
	RoundF16
)

// LowRankRows adds a low-rank product to w (rows x cols float32 values,
// row-major): row i becomes
//
//	float64(w[i,j]) + c[i,0] v[0,j] + c[i,1] v[1,j] + ... + c[i,r-1] v[r-1,j]
//
// with c = coef (rows x r) and v = vecs (r x cols), in float64, each
// product rounded before it is added, the terms added in order of k, and
// a term whose coefficient is 0 skipped (gonum's Daxpy called once per
// term), then rounded once to float32 by ToFloat32For(sum, to). Every set
// gives the same bits: the lanes run over j, each doing the scalar
// operations of one element in the same order.
func LowRankRows(w []float32, coef, vecs []float64, rows, cols, r int, to Rounding) {
	active.lowRankRows(w, coef, vecs, rows, cols, r, to)
}

// ToFloat32For rounds v to float32 such that rounding the result to the
// dtype of to (to nearest, ties to even) gives v rounded to that dtype
// directly: where the float32 value falls exactly on a midpoint of the
// dtype's grid but v does not, it steps one float32 unit toward v (RoundF32,
// and F16 below its normal range or above its largest value, are left as
// they are).
func ToFloat32For(v float64, to Rounding) float32 {
	r := float32(v)
	if to == RoundF32 || float64(r) == v {
		return r
	}
	bits := math.Float32bits(r)
	var mask, half uint32
	switch to {
	case RoundBF16:
		mask, half = 0xffff, 0x8000
	case RoundF16:
		if e := bits >> 23 & 0xff; e < 127-14 || e > 127+15 {
			return r // subnormal or out of F16's range
		}
		mask, half = 0x1fff, 0x1000
	default:
		return r
	}
	if bits&mask != half {
		return r
	}
	if float64(r) < v {
		return math.Nextafter32(r, float32(math.Inf(1)))
	}
	return math.Nextafter32(r, float32(math.Inf(-1)))
}

func lowRankRowsGo(w []float32, coef, vecs []float64, rows, cols, r int, to Rounding) {
	lowRankColsGo(w, coef, vecs, rows, cols, r, to, 0, cols)
}

// lowRankColsGo is LowRankRows on the columns [j0, j1) of every row (the
// vector kernels leave it the columns past their last whole block). The
// columns are taken a chunk at a time, whose r rows of vecs stay in the
// cache while every row of w passes, and eight at a time within a row,
// whose sums stay in registers while the terms are added.
func lowRankColsGo(w []float32, coef, vecs []float64, rows, cols, r int, to Rounding, j0, j1 int) {
	chunk := max(8, lowRankL1Go/max(1, r)&^7)
	for lo := j0; lo < j1; lo += chunk {
		hi := min(lo+chunk, j1)
		for i := range rows {
			row := w[i*cols : (i+1)*cols]
			cs := coef[i*r : i*r+r]
			j := lo
			for ; j+8 <= hi; j += 8 {
				x := (*[8]float32)(row[j : j+8])
				a0, a1, a2, a3 := float64(x[0]), float64(x[1]), float64(x[2]), float64(x[3])
				a4, a5, a6, a7 := float64(x[4]), float64(x[5]), float64(x[6]), float64(x[7])
				for k, c := range cs {
					if c == 0 {
						continue
					}
					v := (*[8]float64)(vecs[k*cols+j:])
					// the explicit conversions round each product: never a fused multiply-add
					a0 += float64(c * v[0])
					a1 += float64(c * v[1])
					a2 += float64(c * v[2])
					a3 += float64(c * v[3])
					a4 += float64(c * v[4])
					a5 += float64(c * v[5])
					a6 += float64(c * v[6])
					a7 += float64(c * v[7])
				}
				x[0], x[1], x[2], x[3] = ToFloat32For(a0, to), ToFloat32For(a1, to), ToFloat32For(a2, to), ToFloat32For(a3, to)
				x[4], x[5], x[6], x[7] = ToFloat32For(a4, to), ToFloat32For(a5, to), ToFloat32For(a6, to), ToFloat32For(a7, to)
			}
			for ; j < hi; j++ {
				a := float64(row[j])
				for k, c := range cs {
					if c != 0 {
						a += float64(c * vecs[k*cols+j])
					}
				}
				row[j] = ToFloat32For(a, to)
			}
		}
	}
}

// lowRankL1Go is how many float64 values of vecs a chunk of columns of the
// portable kernel may hold: 16 KiB, half of a small L1 data cache.
const lowRankL1Go = 2048
