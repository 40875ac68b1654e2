//go:build goexperiment.simd && amd64

package kernels

import (
	"math"
	"simd/archsimd"
	"unsafe"
)

// The fuse kernel (LowRankRows) in vectors of float64 lanes, written once
// at AVX2's width like kernels_avx2.go: the AVX-512 version is generated
// from this file into fuse_avx512_gen.go by internal/gen512 (same rules:
// lane counts only through lanesAVX2). Each lane does the scalar operations
// of one column in the portable kernel's order (a product rounded, then
// added; no fused multiply-add), so the bits are the portable kernel's.

// f64LanesAVX2 is the number of float64 lanes of an AVX2 vector.
const f64LanesAVX2 = lanesAVX2 / 2

// f64SizeAVX2 is the size of a float64 in bytes.
const f64SizeAVX2 = int(unsafe.Sizeof(float64(0)))

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
	if r == 0 {
		lowRankColsGo(w, coef, basis, rows, cols, r, to, 0, cols)
		return
	}
	// rows with a zero coefficient (whose term is skipped) take the kernel that tests each one
	skips := make([]bool, rows)
	for i := range skips {
		for _, c := range coef[i*r : i*r+r] {
			skips[i] = skips[i] || c == 0
		}
	}
	rc := newRoundingAVX2(to)
	sums := make([]float64, 2*chunk) // two rows' sums, from lowRankPairAVX2
	if nWhole > 0 {
		_ = basis[(r-1)*cols+nWhole-1] // every basis load of lowRankPairAVX2 is inside basis
	}
	for lo := 0; lo < nWhole; lo += chunk {
		hi := min(lo+chunk, nWhole)
		for i := 0; i < rows; i++ {
			switch {
			case skips[i]:
				lowRankOneAVX2(w[i*cols+lo:i*cols+hi], coef[i*r:(i+1)*r], basis[lo:], cols, &rc)
			case i+1 < rows && !skips[i+1]:
				// two rows at once: each basis vector loaded serves both
				x0, x1 := w[i*cols+lo:i*cols+hi], w[(i+1)*cols+lo:(i+1)*cols+hi]
				s0, s1 := sums[:hi-lo], sums[chunk:chunk+hi-lo]
				lowRankPairAVX2(unsafe.Pointer(&x0[0]), unsafe.Pointer(&x1[0]), unsafe.Pointer(&s0[0]), unsafe.Pointer(&s1[0]),
					(hi-lo)/lowRankBlockAVX2, unsafe.Pointer(&coef[i*r]), unsafe.Pointer(&coef[(i+1)*r]), r,
					unsafe.Pointer(&basis[lo]), cols)
				storeSumsAVX2(x0, s0, &rc)
				storeSumsAVX2(x1, s1, &rc)
				i++
			default:
				lowRankDenseAVX2(w[i*cols+lo:i*cols+hi], coef[i*r:(i+1)*r], basis[lo:], cols, &rc)
			}
		}
	}
	if nWhole < cols {
		lowRankColsGo(w, coef, basis, rows, cols, r, to, nWhole, cols)
	}
}

// lowRankDenseAVX2 is LowRankRows on the whole blocks of one row x whose
// coefficients cs hold no zero: without a test per term, the loop keeps
// its sums and the broadcast coefficient in registers (Go allocates 15
// vector registers; the loads go straight into the products). The basis
// row k starts at basis[k*stride].
//
//go:noinline
func lowRankDenseAVX2(x []float32, cs, basis []float64, stride int, rc *roundingAVX2) {
	if len(x) == 0 || len(cs) == 0 {
		return
	}
	_ = basis[(len(cs)-1)*stride+len(x)-1] // every load below is inside basis
	base := unsafe.Pointer(unsafe.SliceData(basis))
	vb := f64SizeAVX2 * f64LanesAVX2 // the bytes of a vector
	for j := 0; j+lowRankBlockAVX2 <= len(x); j += lowRankBlockAVX2 {
		xb := (*[lowRankBlockAVX2]float32)(x[j : j+lowRankBlockAVX2])
		a0, a1, a2, a3 := loadBlockAVX2(xb)
		for k, c := range cs {
			p := unsafe.Add(base, f64SizeAVX2*(k*stride+j))
			cb := archsimd.BroadcastFloat64x4(c)
			a0 = a0.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(p))))
			a1 = a1.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(unsafe.Add(p, vb)))))
			a2 = a2.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(unsafe.Add(p, 2*vb)))))
			a3 = a3.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(unsafe.Add(p, 3*vb)))))
		}
		storeBlockAVX2(xb, a0, a1, a2, a3, rc)
	}
}

// lowRankPairAVX2 (assembly: asm_amd64.s, written by internal/genasm) is
// the sums of lowRankDenseAVX2 for two rows x0 and x1 at once, over blocks
// blocks of columns: each lane widens its value, then adds c[k] * basis
// row k rounded (a product, then a sum: no fused multiply-add), for k < r
// in order; the sums go to s0 and s1 (float64, one per column). c0 and c1
// point to the rows' r coefficients, basis to the first column's value of
// basis row 0, whose rows are stride values apart.
//
//go:noescape
func lowRankPairAVX2(x0, x1, s0, s1 unsafe.Pointer, blocks int, c0, c1 unsafe.Pointer, r int, basis unsafe.Pointer, stride int)

// storeSumsAVX2 rounds the sums s of lowRankPairAVX2 (toFloat32ForAVX2)
// into the whole blocks of x.
func storeSumsAVX2(x []float32, s []float64, rc *roundingAVX2) {
	for j := 0; j+lowRankBlockAVX2 <= len(x); j += lowRankBlockAVX2 {
		sb := (*[lowRankBlockAVX2]float64)(s[j : j+lowRankBlockAVX2])
		a0 := archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(sb[0:]))
		a1 := archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(sb[f64LanesAVX2:]))
		a2 := archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(sb[2*f64LanesAVX2:]))
		a3 := archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(sb[3*f64LanesAVX2:]))
		storeBlockAVX2((*[lowRankBlockAVX2]float32)(x[j:j+lowRankBlockAVX2]), a0, a1, a2, a3, rc)
	}
}

// lowRankOneAVX2 is LowRankRows on the whole blocks of one row x, whose
// coefficients cs may hold zeros (those terms are skipped).
//
//go:noinline
func lowRankOneAVX2(x []float32, cs, basis []float64, stride int, rc *roundingAVX2) {
	if len(x) == 0 || len(cs) == 0 {
		return
	}
	_ = basis[(len(cs)-1)*stride+len(x)-1] // every load below is inside basis
	base := unsafe.Pointer(unsafe.SliceData(basis))
	vb := f64SizeAVX2 * f64LanesAVX2 // the bytes of a vector
	for j := 0; j+lowRankBlockAVX2 <= len(x); j += lowRankBlockAVX2 {
		xb := (*[lowRankBlockAVX2]float32)(x[j : j+lowRankBlockAVX2])
		a0, a1, a2, a3 := loadBlockAVX2(xb)
		for k, c := range cs {
			if c == 0 {
				continue
			}
			p := unsafe.Add(base, f64SizeAVX2*(k*stride+j))
			cb := archsimd.BroadcastFloat64x4(c)
			a0 = a0.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(p))))
			a1 = a1.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(unsafe.Add(p, vb)))))
			a2 = a2.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(unsafe.Add(p, 2*vb)))))
			a3 = a3.Add(cb.Mul(archsimd.LoadFloat64x4((*[f64LanesAVX2]float64)(unsafe.Add(p, 3*vb)))))
		}
		storeBlockAVX2(xb, a0, a1, a2, a3, rc)
	}
}

// loadBlockAVX2 converts the float32 values of a block to four vectors of
// float64 sums.
func loadBlockAVX2(xb *[lowRankBlockAVX2]float32) (a0, a1, a2, a3 archsimd.Float64x4) {
	a0 = archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[0:])).ConvertToFloat64()
	a1 = archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[f64LanesAVX2:])).ConvertToFloat64()
	a2 = archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[2*f64LanesAVX2:])).ConvertToFloat64()
	a3 = archsimd.LoadFloat32x4((*[f64LanesAVX2]float32)(xb[3*f64LanesAVX2:])).ConvertToFloat64()
	return
}

// storeBlockAVX2 rounds four vectors of sums (toFloat32ForAVX2) into a block.
func storeBlockAVX2(xb *[lowRankBlockAVX2]float32, a0, a1, a2, a3 archsimd.Float64x4, rc *roundingAVX2) {
	toFloat32ForAVX2(a0, rc).Store((*[f64LanesAVX2]float32)(xb[0:]))
	toFloat32ForAVX2(a1, rc).Store((*[f64LanesAVX2]float32)(xb[f64LanesAVX2:]))
	toFloat32ForAVX2(a2, rc).Store((*[f64LanesAVX2]float32)(xb[2*f64LanesAVX2:]))
	toFloat32ForAVX2(a3, rc).Store((*[f64LanesAVX2]float32)(xb[3*f64LanesAVX2:]))
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
	b := f.AsInt32x4()
	e := b.ShiftAllRight(rc.mantBits32).And(rc.exponent)
	onMid := b.And(rc.low).Equal(rc.mid).And(e.Greater(rc.eLo)).And(rc.eHi.Greater(e))
	if onMid.ToBits() == 0 {
		return f // no lane on a midpoint (almost always)
	}
	av := v.AsInt64x4().And(rc.abs).AsFloat64x4()
	ab := f.ConvertToFloat64().AsInt64x4().And(rc.abs).AsFloat64x4()
	step := rc.one.Masked(ab.Less(av)).Sub(rc.one.Masked(ab.Greater(av))).ConvertToInt32() // +1, -1 or 0
	return b.Add(step.Masked(onMid)).AsFloat32x4()
}
