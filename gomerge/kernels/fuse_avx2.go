//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"simd/archsimd"
)

// The fuse kernel (LowRankRows) in vectors of float64 lanes, written once
// at AVX2's width like kernels_avx2.go: the AVX-512 version is generated
// from this file into fuse_avx512_gen.go by internal/gen512 (same rules:
// lane counts only through lanesAVX2). Each lane does the scalar operations
// of one column in the portable kernel's order (a product rounded, then
// added; no fused multiply-add), so the bits are the portable kernel's.

// f64LanesAVX2 is the number of float64 lanes of an AVX2 vector.
const f64LanesAVX2 = lanesAVX2 / 2

// lowRankBlockAVX2 is the columns of one register block: four vectors of
// float64 sums, which stay in registers while the terms are added.
const lowRankBlockAVX2 = 4 * f64LanesAVX2

// lowRankL1AVX2 is how many float64 values of the basis rows a chunk of
// columns may hold: 16 KiB, half of a small L1 data cache.
const lowRankL1AVX2 = 2048

// roundingAVX2 holds the constants of toFloat32ForAVX2 (built when the
// kernel starts: no vector value in a package-level variable).
type roundingAVX2 struct {
	nudge      bool // a half-precision dtype follows: keep off its midpoints
	abs        archsimd.Int64x4
	one        archsimd.Float64x4
	low, mid   archsimd.Int32x4 // the bits below the dtype's last place, and its midpoint
	eLo, eHi   archsimd.Int32x4 // the float32 exponents (biased) where the dtype is normal: eLo < e < eHi
	exponent   archsimd.Int32x4
	mantBits32 uint64
}

func newRoundingAVX2(to Rounding) roundingAVX2 {
	rc := roundingAVX2{
		nudge:      to == RoundBF16 || to == RoundF16,
		abs:        archsimd.BroadcastInt64x4(math.MaxInt64),
		one:        archsimd.BroadcastFloat64x4(1),
		exponent:   archsimd.BroadcastInt32x4(0xff),
		mantBits32: 23,
	}
	if to == RoundF16 {
		rc.low, rc.mid = archsimd.BroadcastInt32x4(0x1fff), archsimd.BroadcastInt32x4(0x1000)
		rc.eLo, rc.eHi = archsimd.BroadcastInt32x4(127-15), archsimd.BroadcastInt32x4(127+16)
	} else {
		rc.low, rc.mid = archsimd.BroadcastInt32x4(0xffff), archsimd.BroadcastInt32x4(0x8000)
		rc.eLo, rc.eHi = archsimd.BroadcastInt32x4(-1), archsimd.BroadcastInt32x4(256)
	}
	return rc
}

func lowRankRowsAVX2(w []float32, coef, basis []float64, rows, cols, r int, to Rounding) {
	nWhole := cols / lowRankBlockAVX2 * lowRankBlockAVX2
	chunk := max(lowRankBlockAVX2, lowRankL1AVX2/max(1, r)/lowRankBlockAVX2*lowRankBlockAVX2)
	rc := newRoundingAVX2(to)
	for lo := 0; lo < nWhole; lo += chunk {
		hi := min(lo+chunk, nWhole)
		for i := range rows {
			lowRankRowAVX2(w[i*cols+lo:i*cols+hi], coef[i*r:i*r+r], basis[lo:], cols, &rc)
		}
	}
	if nWhole < cols {
		lowRankColsGo(w, coef, basis, rows, cols, r, to, nWhole, cols)
	}
}

// lowRankRowAVX2 is LowRankRows on one row x (whole blocks), with the
// coefficients cs; the basis row k starts at basis[k*stride].
//
//go:noinline
func lowRankRowAVX2(x []float32, cs, basis []float64, stride int, rc *roundingAVX2) {
	for j := 0; j+lowRankBlockAVX2 <= len(x); j += lowRankBlockAVX2 {
		xb := (*[lowRankBlockAVX2]float32)(x[j : j+lowRankBlockAVX2])
		a0 := archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[0:])).ConvertToFloat64()
		a1 := archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[f64LanesAVX2:])).ConvertToFloat64()
		a2 := archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[2*f64LanesAVX2:])).ConvertToFloat64()
		a3 := archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[3*f64LanesAVX2:])).ConvertToFloat64()
		for k, c := range cs {
			if c == 0 {
				continue
			}
			cb := archsimd.BroadcastFloat64x4(c)
			v := (*[lowRankBlockAVX2]float64)(basis[k*stride+j : k*stride+j+lowRankBlockAVX2])
			a0 = a0.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(v[0:]))))
			a1 = a1.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(v[f64LanesAVX2:]))))
			a2 = a2.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(v[2*f64LanesAVX2:]))))
			a3 = a3.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(v[3*f64LanesAVX2:]))))
		}
		toFloat32ForAVX2(a0, rc).Store((*[f64LanesAVX2]float32)(xb[0:]))
		toFloat32ForAVX2(a1, rc).Store((*[f64LanesAVX2]float32)(xb[f64LanesAVX2:]))
		toFloat32ForAVX2(a2, rc).Store((*[f64LanesAVX2]float32)(xb[2*f64LanesAVX2:]))
		toFloat32ForAVX2(a3, rc).Store((*[f64LanesAVX2]float32)(xb[3*f64LanesAVX2:]))
	}
}

// toFloat32ForAVX2 is ToFloat32For on each lane: the float32 rounding of
// v, stepped one unit of its magnitude bits toward v where it falls on a
// midpoint of the half-precision grid (its low bits equal rc.mid, within
// the exponents where the dtype is normal) and v is not that value (and
// not a NaN: neither comparison holds then).
func toFloat32ForAVX2(v archsimd.Float64x4, rc *roundingAVX2) archsimd.Float32x4 {
	f := v.ConvertToFloat32()
	if !rc.nudge {
		return f
	}
	av := v.AsInt64x4().And(rc.abs).AsFloat64x4()
	ab := f.ConvertToFloat64().AsInt64x4().And(rc.abs).AsFloat64x4()
	step := rc.one.Masked(ab.Less(av)).Sub(rc.one.Masked(ab.Greater(av))).ConvertToInt32() // +1, -1 or 0
	b := f.AsInt32x4()
	e := b.ShiftAllRight(rc.mantBits32).And(rc.exponent)
	onMid := b.And(rc.low).Equal(rc.mid).And(e.Greater(rc.eLo)).And(rc.eHi.Greater(e))
	return b.Add(step.Masked(onMid)).AsFloat32x4()
}
