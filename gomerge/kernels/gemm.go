package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"runtime"
	"sync"
	"time"
	"unsafe"

	"gomerge/gomerge/internal/pool"
)

// The blocked float32 matrix product of the randomized SVD's sketches
// (gomerge/linalg's rsvd.go): packing into panels, then a register-blocked
// micro-kernel per kernel set (gemm_simd.go: AVX2 and AVX-512, with fused
// multiply-adds; here: portable Go).
//
// Every entry of the product is one chain of fused multiply-adds over the
// inner dimension in order, from +0: c = fma(a[i,0], b[0,j], +0), then
// c = fma(a[i,p], b[p,j], c) for p = 1, 2, ... Blocking, packing, threads
// and vector width only decide which entries are computed together, never
// the order of one entry's operations, so every set, every core count and
// every machine give the same bits. The portable set computes each fused
// multiply-add exactly (fma32), as the hardware does.

// gemmKernel is one set's micro-kernel: micro computes a mr x nr tile of
// C from kc steps of an A strip (mr values per step, lda values apart: a
// packed strip, or a transposed A's own rows) and of a packed B strip (nr
// values per step), starting from +0 (first) or from the tile's values in
// c (row stride ldc).
type gemmKernel[T float32 | float64] struct {
	mr, nr int
	micro  func(kc int, ap []T, lda int, bp, c []T, ldc int, first bool)
}

// gemmKernels and gemm64Kernels are the float32 and float64 micro-kernels
// of the sets, by name (gemm_simd.go adds the vector ones).
var (
	gemmKernels   = map[string]gemmKernel[float32]{"go": {mr: 4, nr: 4, micro: microGo}}
	gemm64Kernels = map[string]gemmKernel[float64]{"go": {mr: 4, nr: 4, micro: micro64Go}}
)

// Block sizes: a kc x nr strip of packed B stays in the L1 cache while the
// micro-kernel runs over the mc x kc block of packed A (L2).
const (
	gemmKC = 256
	gemmMC = 96
	// gemmNC is the columns of one task: a task packs its block of A once
	// for this many columns.
	gemmNC = 512
	// directStrips is the most strips of B for which a transposed A is read
	// in place (direct in gemm)
	directStrips = 2
)

// MatrixOf is a row-major matrix view: entry (i, j) is Data[i*Stride+j],
// or Data[j*Stride+i] when Trans (the view is the transpose of the stored
// matrix).
type MatrixOf[T float32 | float64] struct {
	Rows, Cols, Stride int
	Trans              bool
	Data               []T
}

// Matrix and Matrix64 are float32 and float64 matrix views.
type (
	Matrix   = MatrixOf[float32]
	Matrix64 = MatrixOf[float64]
)

// Transposed is the view of x's transpose (no copy).
func (x MatrixOf[T]) Transposed() MatrixOf[T] {
	return MatrixOf[T]{Rows: x.Cols, Cols: x.Rows, Stride: x.Stride, Trans: !x.Trans, Data: x.Data}
}

func (x MatrixOf[T]) at(i, j int) T {
	if x.Trans {
		return x.Data[j*x.Stride+i]
	}
	return x.Data[i*x.Stride+j]
}

// Gemm32 writes the product A B into c (m x n, row-major, row stride ldc),
// for A of m x k and B of k x n: each entry is the chain of fused
// multiply-adds of its k products in order from +0 (the same bits on every
// kernel set), computed by the set in use on all cores.
func Gemm32(a, b Matrix, c []float32, ldc int) error {
	return gemm(gemmKernels[active.name], runtime.GOMAXPROCS(0), a, b, c, ldc)
}

// Gemm32With is Gemm32 on the kernel set named set and threads goroutines
// (benchmarks and tests; an error when this build or CPU lacks the set).
func Gemm32With(set string, threads int, a, b Matrix, c []float32, ldc int) error {
	k, err := runnableSet(set)
	if err != nil {
		return err
	}
	return gemm(gemmKernels[k.name], max(1, threads), a, b, c, ldc)
}

// Gemm64 is Gemm32 in float64: each entry is the chain of fused
// multiply-adds of its k products in order from +0 (math.FMA's bits).
func Gemm64(a, b Matrix64, c []float64, ldc int) error {
	return gemm(gemm64Kernels[active.name], runtime.GOMAXPROCS(0), a, b, c, ldc)
}

// Gemm64With is Gemm64 on the kernel set named set and threads goroutines.
func Gemm64With(set string, threads int, a, b Matrix64, c []float64, ldc int) error {
	k, err := runnableSet(set)
	if err != nil {
		return err
	}
	return gemm(gemm64Kernels[k.name], max(1, threads), a, b, c, ldc)
}

// runnableSet returns the kernel set named name if this CPU runs it.
func runnableSet(name string) (kernels, error) {
	for _, k := range kernelSets {
		if k.name == name {
			if m := k.missing(); len(m) > 0 {
				return k, fmt.Errorf("kernel set %s: this CPU lacks %v", name, m)
			}
			return k, nil
		}
	}
	return portableKernels, fmt.Errorf("kernel set %q is not in this build (it has %v)", name, Runnable())
}

func gemm[T float32 | float64](g gemmKernel[T], threads int, a, b MatrixOf[T], c []T, ldc int) error {
	m, k, n := a.Rows, a.Cols, b.Cols
	switch {
	case b.Rows != k:
		return fmt.Errorf("gemm: A is %d x %d but B is %d x %d", m, k, b.Rows, n)
	case ldc < n || (m > 0 && len(c) < (m-1)*ldc+n):
		return fmt.Errorf("gemm: C of %d values (stride %d) cannot hold %d x %d", len(c), ldc, m, n)
	}
	if m == 0 || n == 0 {
		return nil
	}
	if k == 0 {
		for i := range m {
			clear(c[i*ldc : i*ldc+n])
		}
		return nil
	}
	if m <= directStrips*g.nr && n >= 4*m {
		// few rows and many columns (the sketch's Y^T D): C^T = B^T A^T instead, whose many rows are B's
		// columns, read in place (see direct), and whose B (A^T) has at most directStrips strips. Each entry
		// is the same chain (a multiply-add's product is the same with its factors swapped)
		ct, put := scratch[T](n * m)
		defer put()
		if err := gemm(g, threads, b.Transposed(), a.Transposed(), ct, m); err != nil {
			return err
		}
		for i := range m {
			row := c[i*ldc : i*ldc+n]
			for j := range row {
				row[j] = ct[j*m+i]
			}
		}
		return nil
	}
	mr, nr := g.mr, g.nr
	nStrips := (n + nr - 1) / nr
	mBlocks := (m + gemmMC - 1) / gemmMC
	nChunk := gemmNC / nr // strips per task
	nBlocks := (nStrips + nChunk - 1) / nChunk
	tasks := mBlocks * nBlocks
	workers := max(1, min(threads, tasks))
	// each worker's packed block of A, then its edge tile
	aps := make([][]T, workers)
	for w := range aps {
		var put func()
		aps[w], put = scratch[T](gemmMC*gemmKC + mr*gemmKC + mr*nr)
		defer put()
	}
	// direct says whether the strip of A's rows i.. (of a block ending at row i1) is read in place: a
	// transposed A holds each step's mr values side by side, so a whole strip needs no packing, and where B
	// has at most directStrips strips each of A's values serves that few times: packing would cost more
	// than it saves (on S2's sketch, Y^T D with 26 rows: 1.8x faster on AVX-512, 1.4x on AVX2, 2 threads)
	direct := func(i, i1 int) bool { return a.Trans && nStrips <= directStrips && i+mr <= i1 }
	// block computes the tile of rows block ib and columns block jb of C for the steps pc..pc+kc of the inner
	// dimension on worker w, with strip s of packed B from bstrip
	block := func(w, ib, jb, pc, kc int, bstrip func(s int) []T) {
		first := pc == 0
		i0, i1 := ib*gemmMC, min((ib+1)*gemmMC, m)
		ap, tile := aps[w][:gemmMC*gemmKC+mr*gemmKC], aps[w][gemmMC*gemmKC+mr*gemmKC:]
		// A's block: rows i0..i1, strip r holds rows i0+r*mr.., kc steps of mr values (zero past i1)
		rStrips := (i1 - i0 + mr - 1) / mr
		for r := range rStrips {
			if !direct(i0+r*mr, i1) {
				packA(ap[r*kc*mr:(r+1)*kc*mr], a, i0+r*mr, min(mr, i1-i0-r*mr), pc, kc, mr)
			}
		}
		for s := jb * nChunk; s < min((jb+1)*nChunk, nStrips); s++ {
			bs := bstrip(s)
			j0 := s * nr
			cols := min(nr, n-j0)
			for r := range rStrips {
				as, lda := ap[r*kc*mr:(r+1)*kc*mr], mr
				ib0 := i0 + r*mr
				if direct(ib0, i1) {
					as, lda = a.Data[pc*a.Stride+ib0:], a.Stride
				}
				rows := min(mr, i1-ib0)
				if rows == mr && cols == nr {
					g.micro(kc, as, lda, bs, c[ib0*ldc+j0:], ldc, first)
					continue
				}
				// an edge tile: through a whole one
				if !first {
					for ii := range rows {
						copy(tile[ii*nr:ii*nr+cols], c[(ib0+ii)*ldc+j0:])
					}
				}
				g.micro(kc, as, lda, bs, tile, nr, first)
				for ii := range rows {
					copy(c[(ib0+ii)*ldc+j0:(ib0+ii)*ldc+j0+cols], tile[ii*nr:])
				}
			}
		}
	}
	if mBlocks == 1 {
		// one block of rows (the sketch's Y^T D, whose B is large): each task owns an equal share of the columns
		// and packs them, a row of B at a time (packBRows), for each step of the inner dimension, and uses them
		// at once (the longer the piece of each row of B a task reads, the faster B streams from memory: on a
		// Zen 4, one thread on E1's shape, 1.1x from 512 to 1024 columns and 1.3x more to 2048)
		nChunk = (nStrips + workers - 1) / workers
		nBlocks = (nStrips + nChunk - 1) / nChunk
		run(workers, nBlocks, func(w, jb int) {
			bw, put := scratch[T](gemmKC * nChunk * nr)
			defer put()
			s0, s1 := jb*nChunk, min((jb+1)*nChunk, nStrips)
			for pc := 0; pc < k; pc += gemmKC {
				kc := min(gemmKC, k-pc)
				packBRows(bw, b, pc, kc, s0, s1, nr)
				block(w, 0, jb, pc, kc, func(s int) []T { return bw[(s-s0)*kc*nr : (s-s0+1)*kc*nr] })
			}
		})
		return nil
	}
	if nBlocks == 1 {
		// one block of columns (the sketch's D Z, whose B is small): B is packed whole, once, and each task owns
		// a block of rows through the whole inner dimension, with no barrier between its steps
		steps := (k + gemmKC - 1) / gemmKC
		bp, put := scratch[T](steps * gemmKC * nStrips * nr)
		defer put()
		panel := func(pc int) []T { return bp[pc/gemmKC*gemmKC*nStrips*nr:] }
		run(min(threads, steps), steps, func(_, t int) {
			pc := t * gemmKC
			packBRows(panel(pc), b, pc, min(gemmKC, k-pc), 0, nStrips, nr)
		})
		run(workers, mBlocks, func(w, ib int) {
			for pc := 0; pc < k; pc += gemmKC {
				kc := min(gemmKC, k-pc)
				block(w, ib, 0, pc, kc, func(s int) []T { return panel(pc)[s*kc*nr : (s+1)*kc*nr] })
			}
		})
		return nil
	}
	bp, put := scratch[T](gemmKC * nStrips * nr)
	defer put()
	for pc := 0; pc < k; pc += gemmKC {
		kc := min(gemmKC, k-pc)
		// B's panel, shared: rows pc..pc+kc, strip s holds columns s*nr.. (zero past n), kc steps of nr values;
		// each packer reads a share of the strips a row at a time
		packers := min(threads, nStrips)
		per := (nStrips + packers - 1) / packers
		run(packers, packers, func(_, t int) {
			s0 := min(t*per, nStrips)
			packBRows(bp[s0*kc*nr:], b, pc, kc, s0, min(s0+per, nStrips), nr)
		})
		run(workers, tasks, func(w, t int) {
			block(w, t/nBlocks, t%nBlocks, pc, kc, func(s int) []T { return bp[s*kc*nr : (s+1)*kc*nr] })
		})
	}
	return nil
}

// packB writes B's rows pc..pc+kc, columns j0..j0+nr (zero past its
// last column), into dst: kc steps of nr values.
func packB[T float32 | float64](dst []T, b MatrixOf[T], pc, kc, j0, nr int) {
	cols := min(nr, b.Cols-j0)
	if !b.Trans {
		for p := range kc {
			row := dst[p*nr : (p+1)*nr]
			copy(row, b.Data[(pc+p)*b.Stride+j0:(pc+p)*b.Stride+j0+cols])
			clear(row[cols:])
		}
		return
	}
	for j := range nr {
		if j >= cols {
			for p := range kc {
				dst[p*nr+j] = 0
			}
			continue
		}
		col := b.Data[(j0+j)*b.Stride+pc : (j0+j)*b.Stride+pc+kc]
		for p, v := range col {
			dst[p*nr+j] = v
		}
	}
}

// packBRows packs strips s0..s1 of B's rows pc..pc+kc into dst (strip s at
// (s-s0)*kc*nr, as packB), reading B a row at a time when it is not
// transposed: a few long sequential reads that the hardware prefetches,
// where packB's strip by strip reads jump a row of B every nr values.
func packBRows[T float32 | float64](dst []T, b MatrixOf[T], pc, kc, s0, s1, nr int) {
	if b.Trans {
		for s := s0; s < s1; s++ {
			packB(dst[(s-s0)*kc*nr:(s-s0+1)*kc*nr], b, pc, kc, s*nr, nr)
		}
		return
	}
	j0, j1 := s0*nr, min(s1*nr, b.Cols)
	whole := s0 + (j1-j0)/nr // strips before it lie inside B
	for p := range kc {
		row := b.Data[(pc+p)*b.Stride+j0 : (pc+p)*b.Stride+j1]
		for s := s0; s < whole; s++ {
			copyStrip(dst[(s-s0)*kc*nr+p*nr:], row[(s-s0)*nr:], nr)
		}
		for s := whole; s < s1; s++ {
			d := dst[(s-s0)*kc*nr+p*nr : (s-s0)*kc*nr+(p+1)*nr]
			c := copy(d, row[min((s-s0)*nr, len(row)):])
			clear(d[c:])
		}
	}
}

// copyStrip copies the first nr values of src into dst: for the strip
// widths of the vector sets, one move of an array that the compiler writes
// inline (copy's call costs as much as the move of a strip).
func copyStrip[T float32 | float64](dst, src []T, nr int) {
	switch nr {
	case 32:
		*(*[32]T)(dst) = *(*[32]T)(src)
	case 16:
		*(*[16]T)(dst) = *(*[16]T)(src)
	case 8:
		*(*[8]T)(dst) = *(*[8]T)(src)
	default:
		copy(dst[:nr], src)
	}
}

// packA writes A's rows i0..i0+rows (rows <= mr; zero after them), columns
// pc..pc+kc, into dst: kc steps of mr values.
func packA[T float32 | float64](dst []T, a MatrixOf[T], i0, rows, pc, kc, mr int) {
	if a.Trans {
		for p := range kc {
			step := dst[p*mr : (p+1)*mr]
			src := a.Data[(pc+p)*a.Stride+i0:]
			for ii := range step { // a few values: a loop, not copy's call
				if ii < rows {
					step[ii] = src[ii]
				} else {
					step[ii] = 0
				}
			}
		}
		return
	}
	dst = dst[:kc*mr]
	ii := 0
	for ; ii+4 <= rows; ii += 4 {
		// four rows side by side: one bounds check per four values written
		at := func(r int) []T { return a.Data[(i0+r)*a.Stride+pc:][:kc] }
		r0, r1, r2, r3 := at(ii), at(ii+1), at(ii+2), at(ii+3)
		for p := range kc {
			q := (*[4]T)(dst[p*mr+ii:])
			q[0], q[1], q[2], q[3] = r0[p], r1[p], r2[p], r3[p]
		}
	}
	for ; ii < mr; ii++ {
		if ii >= rows {
			for p := range kc {
				dst[p*mr+ii] = 0
			}
			continue
		}
		row := a.Data[(i0+ii)*a.Stride+pc : (i0+ii)*a.Stride+pc+kc]
		for p, v := range row {
			dst[p*mr+ii] = v
		}
	}
}

// maxScratch is the largest buffer (in float32 values: 1 MiB) that gemm
// takes from the shared pool: enough for the small products of the SVD's
// Gram route (a worker's packed block of A, 220 KiB in float64, and B's
// strips), where fresh buffers, cleared by the allocator, cost more than
// the arithmetic. A large product's packed B (megabytes) is allocated, so
// that the pool does not keep it past the product: pooled up to 4 MiB,
// the buffers raised bench S3's peak RSS by some 50 MiB.
const maxScratch = 1 << 18

// scratch returns a buffer of n values with undefined contents (gemm's
// packing buffers, which every step writes whole before it reads them),
// pooled up to maxScratch, and the call that gives it back.
func scratch[T float32 | float64](n int) ([]T, func()) {
	per := int(unsafe.Sizeof(T(0))) / 4
	if n*per > maxScratch {
		return make([]T, n), func() {}
	}
	buf := pool.Get(n * per)
	return unsafe.Slice((*T)(unsafe.Pointer(unsafe.SliceData(buf))), n), func() { pool.Put(buf) }
}

// run calls f(worker, task) for tasks 0..n-1 on up to workers goroutines
// (worker numbers below workers), and returns when all are done.
func run(workers, n int, f func(w, t int)) {
	if workers <= 1 || n <= 1 {
		for t := range n {
			f(0, t)
		}
		return
	}
	var next sync.Mutex
	t := 0
	var wg sync.WaitGroup
	for w := range min(workers, n) {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				next.Lock()
				i := t
				t++
				next.Unlock()
				if i >= n {
					return
				}
				f(w, i)
			}
		}()
	}
	wg.Wait()
}

// microGo is the portable micro-kernel: a 4 x 4 tile in scalars.
func microGo(kc int, ap []float32, lda int, bp, c []float32, ldc int, first bool) {
	var acc [16]float32
	if !first {
		for i := range 4 {
			copy(acc[4*i:4*i+4], c[i*ldc:i*ldc+4])
		}
	}
	for p := range kc {
		a, b := (*[4]float32)(ap[p*lda:]), (*[4]float32)(bp[4*p:])
		for i, x := range a {
			row := (*[4]float32)(acc[4*i:])
			for j, y := range b {
				// a*b + c rounded once (see fma32Slow), the common case written out
				s := float64(float64(x)*float64(y)) + float64(row[j])
				if bits := math.Float64bits(s); bits&(1<<29-1) != 1<<28 && bits&(0x7ff<<52) >= 0x381<<52 {
					row[j] = float32(s)
				} else {
					row[j] = fma32Slow(float64(x)*float64(y), float64(row[j]))
				}
			}
		}
	}
	for i := range 4 {
		copy(c[i*ldc:i*ldc+4], acc[4*i:4*i+4])
	}
}

// micro64Go is the portable float64 micro-kernel: a 4 x 4 tile of
// math.FMA chains.
func micro64Go(kc int, ap []float64, lda int, bp, c []float64, ldc int, first bool) {
	var acc [16]float64
	if !first {
		for i := range 4 {
			copy(acc[4*i:4*i+4], c[i*ldc:i*ldc+4])
		}
	}
	for p := range kc {
		a, b := (*[4]float64)(ap[p*lda:]), (*[4]float64)(bp[4*p:])
		for i, x := range a {
			row := (*[4]float64)(acc[4*i:])
			row[0] = math.FMA(x, b[0], row[0])
			row[1] = math.FMA(x, b[1], row[1])
			row[2] = math.FMA(x, b[2], row[2])
			row[3] = math.FMA(x, b[3], row[3])
		}
	}
	for i := range 4 {
		copy(c[i*ldc:i*ldc+4], acc[4*i:4*i+4])
	}
}

// The portable micro-kernel's fused multiply-add, a*b + c rounded once to
// float32 as the instruction does: the product of two float32 is exact in
// float64, and the sum s rounded to float64 then rounds to float32 as the
// exact value would unless s lies on a midpoint between two float32
// (rounding to float64 cannot step over one, but may land on it) or in
// float32's subnormal range (whose midpoints lie elsewhere): those rare
// cases take fma32Slow.
// fma32Slow is fma32's sum p + z rounded to float64 to odd (the error of
// the sum, from Knuth's TwoSum, decides the last bit), which then rounds to
// float32 as the exact value would (53 >= 24 + 2 bits: Boldo and Melquiond
// 2008).
//
//go:noinline
func fma32Slow(p, z float64) float32 {
	s := p + z
	bv := s - p
	e := (p - (s - bv)) + (z - bv)
	bits := math.Float64bits(s)
	if e != 0 && bits&1 == 0 && bits&0x7ff0000000000000 != 0x7ff0000000000000 {
		if (e > 0) == (s > 0) {
			bits++ // away from zero, towards the exact value
		} else {
			bits--
		}
	}
	return float32(math.Float64frombits(bits))
}

// GemmRate times Gemm32 on the kernel set named set and threads goroutines
// for about d, on a product A (m x k) B (k x n) of random values laid out
// as the randomized SVD's Y^T D (A stored transposed): the rate in flops
// per second (2 per multiply-add), on the wall clock and per second of CPU
// time of the process times threads (what threads cores of its own would
// do).
func GemmRate(set string, threads, m, n, k int, d time.Duration, rng *rand.Rand) (Rate, error) {
	if _, err := runnableSet(set); err != nil {
		return Rate{}, err
	}
	a := Matrix{Rows: m, Cols: k, Stride: m, Trans: true, Data: make([]float32, m*k)}
	b := Matrix{Rows: k, Cols: n, Stride: n, Data: make([]float32, k*n)}
	for _, x := range [][]float32{a.Data, b.Data} {
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
	}
	c := make([]float32, m*n)
	if err := Gemm32With(set, threads, a, b, c, n); err != nil { // warm up
		return Rate{}, err
	}
	flops := 0.0
	c0, start := cpuSeconds(false), time.Now()
	for flops == 0 || time.Since(start) < d {
		_ = Gemm32With(set, threads, a, b, c, n)
		flops += 2 * float64(m) * float64(n) * float64(k)
	}
	r := Rate{Wall: flops / time.Since(start).Seconds()}
	if cpu := cpuSeconds(false) - c0; cpu > 0 {
		r.CPU = flops / cpu * float64(max(1, threads))
	}
	return r, nil
}
