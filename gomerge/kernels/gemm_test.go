package kernels

import (
	"math"
	"math/big"
	"math/rand/v2"
	"runtime"
	"testing"
	"time"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gonum.org/v1/gonum/blas"
	"gonum.org/v1/gonum/blas/blas64"
)

// The portable micro-kernel's multiply-add against the exact a*b + c
// rounded once to float32 (math/big), on
// random operands, near-cancellations, ties of the float32 rounding and
// subnormal results.
func TestPortableFMA(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	exact := func(a, b, c float32) float32 {
		x := new(big.Float).SetPrec(400).SetFloat64(float64(a))
		x.Mul(x, new(big.Float).SetPrec(400).SetFloat64(float64(b)))
		x.Add(x, new(big.Float).SetPrec(400).SetFloat64(float64(c)))
		f, _ := x.Float32() // nearest, ties to even
		return f
	}
	cases := [][3]float32{
		{1, 1, 0}, {0, 5, float32(math.Copysign(0, -1))}, {float32(math.Copysign(0, -1)), 5, 0},
		{1 + 1.0/(1<<23), 1 - 1.0/(1<<23), -1}, // the product's tail alone survives
		{1 + 1.0/(1<<12), 1 + 1.0/(1<<12), 0},  // a product with a 2^-24 tail: ties in float32
		// the same tie and an addend below float64's resolution, which decides the rounding: a float64 sum
		// rounded again to float32 would round it the other way (double rounding)
		{1 + 1.0/(1<<12), 1 + 1.0/(1<<12), float32(math.Ldexp(1, -80))},
		{-1 - 1.0/(1<<12), 1 + 1.0/(1<<12), float32(math.Ldexp(-1, -80))},
		{1 + 1.0/(1<<12), 1 + 1.0/(1<<12), float32(math.Ldexp(-1, -80))},
		{1 << 12, 1 << 12, 1.0 / (1 << 40)}, // a tiny addend: a sticky bit only
		{1e-30, 1e-10, 1e-45},               // subnormal results
		{float32(math.Inf(1)), 1, 1}, {float32(math.NaN()), 1, 1},
	}
	for range 100000 {
		a := float32(rng.NormFloat64()) * float32(math.Ldexp(1, rng.IntN(40)-20))
		b := float32(rng.NormFloat64())
		c := -a * b * float32(1+rng.NormFloat64()*math.Ldexp(1, -rng.IntN(30)))
		cases = append(cases, [3]float32{a, b, c})
	}
	// through the portable micro-kernel: one step of a 4 x 4 tile from C, whose diagonal entries are the cases
	for len(cases)%4 != 0 {
		cases = append(cases, cases[0])
	}
	for q := 0; q < len(cases); q += 4 {
		var a, b [4]float32
		var c [16]float32
		for i := range 4 {
			a[i], b[i], c[5*i] = cases[q+i][0], cases[q+i][1], cases[q+i][2]
		}
		microGo(1, a[:], 4, b[:], c[:], 4, false)
		for i, x := range cases[q : q+4] {
			got := c[5*i]
			if math.IsNaN(float64(x[0])) || math.IsInf(float64(x[0]), 0) {
				require.Equal(t, math.IsNaN(float64(x[0])), math.IsNaN(float64(got)))
				continue
			}
			want := exact(x[0], x[1], x[2])
			require.Equal(t, math.Float32bits(want), math.Float32bits(got), "fma(%v, %v, %v)", x[0], x[1], x[2])
		}
	}
}

// Gemm32 on every set this CPU runs: the same bits as the portable set (for
// every layout, edge tiles and blockings across the inner dimension), and
// within the rounding bound of gonum's float64 product.
func TestGemm32(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(7, 11))
	shapes := [][3]int{
		{1, 1, 1}, {3, 5, 7}, {6, 16, 1}, {6, 32, 300}, {7, 17, 513}, {97, 74, 260},
		{200, 33, 600}, {74, 1100, 257}, {130, 600, 300}, {13, 2, 1}, {5, 0, 3}, {0, 4, 4}, {4, 5, 0},
		{20, 300, 600}, {40, 700, 300}, {5, 90, 260}, {130, 20, 600}, // C^T = B^T A^T, A read in place
	}
	for _, sh := range shapes {
		m, n, k := sh[0], sh[1], sh[2]
		for _, ta := range []bool{false, true} {
			for _, tb := range []bool{false, true} {
				a := matrix(rng, m, k, ta)
				b := matrix(rng, k, n, tb)
				const pad = 3 // a row stride of C wider than n
				ldc := n + pad
				want := make([]float32, max(0, m*ldc))
				require.NoError(t, gemm(gemmKernels["go"], 1, a, b, want, ldc))
				checkGonum(t, a, b, want, ldc)
				for _, s := range sets {
					for _, threads := range []int{1, 3} {
						got := make([]float32, len(want))
						for i := range got {
							got[i] = 42 // C's old values must not matter, nor the padding change
						}
						require.NoError(t, gemm(gemmKernels[s.name], threads, a, b, got, ldc))
						for i := range m {
							sameBits(t, want[i*ldc:i*ldc+n], got[i*ldc:i*ldc+n], s.name+" vs portable")
							for j := n; j < ldc && i*ldc+j < len(got); j++ {
								require.Equal(t, float32(42), got[i*ldc+j], "padding of C written")
							}
						}
					}
				}
			}
		}
	}
}

// Gemm64 on every set this CPU runs: the same bits as the portable set, and
// within the rounding bound of gonum's product.
func TestGemm64(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(8, 9))
	for _, sh := range [][3]int{{1, 1, 1}, {5, 9, 3}, {4, 16, 300}, {9, 17, 513}, {130, 40, 270}, {3, 0, 2}} {
		m, n, k := sh[0], sh[1], sh[2]
		for _, ta := range []bool{false, true} {
			for _, tb := range []bool{false, true} {
				a, b := matrix64(matrix(rng, m, k, ta)), matrix64(matrix(rng, k, n, tb))
				ldc := n + 2
				want := make([]float64, m*ldc)
				require.NoError(t, gemm(gemm64Kernels["go"], 1, a, b, want, ldc))
				u := math.Ldexp(1, -53)
				for i := range m {
					for j := range n {
						exact, bound := 0.0, 0.0
						for p := range k {
							exact += a.at(i, p) * b.at(p, j) // products of float32 values: exact
							bound += math.Abs(a.at(i, p) * b.at(p, j))
						}
						require.InDelta(t, exact, want[i*ldc+j], 2*float64(k)*u*bound+1e-300)
					}
				}
				for _, s := range sets {
					got := make([]float64, len(want))
					require.NoError(t, gemm(gemm64Kernels[s.name], 2, a, b, got, ldc))
					for e := range want {
						require.Equal(t, math.Float64bits(want[e]), math.Float64bits(got[e]), "%s vs portable, entry %d", s.name, e)
					}
				}
			}
		}
	}
}

func matrix64(x Matrix) Matrix64 {
	y := Matrix64{Rows: x.Rows, Cols: x.Cols, Stride: x.Stride, Trans: x.Trans, Data: make([]float64, len(x.Data))}
	for i, v := range x.Data {
		y.Data[i] = float64(v)
	}
	return y
}

func TestGemm32Errors(t *testing.T) {
	a := Matrix{Rows: 2, Cols: 3, Stride: 3, Data: make([]float32, 6)}
	b := Matrix{Rows: 4, Cols: 2, Stride: 2, Data: make([]float32, 8)}
	require.ErrorContains(t, Gemm32(a, b, make([]float32, 4), 2), "A is 2 x 3 but B is 4 x 2")
	b.Rows = 3
	require.ErrorContains(t, Gemm32(a, b, make([]float32, 3), 2), "cannot hold 2 x 2")
	require.ErrorContains(t, Gemm32With("nope", 1, a, b, make([]float32, 4), 2), "not in this build")
}

// matrix is a rows x cols view with random entries (some zero and negative
// zero), stored transposed when trans, with a stride wider than a row.
func matrix(rng *rand.Rand, rows, cols int, trans bool) Matrix {
	r, c := rows, cols
	if trans {
		r, c = cols, rows
	}
	stride := c + 1
	data := kernelInputs(rng, 1, r*stride, true)[0]
	return Matrix{Rows: rows, Cols: cols, Stride: stride, Trans: trans, Data: data}
}

// checkGonum compares c with gonum's float64 product of a and b: each entry
// is within k float32 roundings of sum |a||b| (a chain of k fused
// multiply-adds rounds k times, each by at most half an ulp of a partial
// sum bounded by that sum; Higham, Accuracy and Stability, 3.1).
func checkGonum(t *testing.T, a, b Matrix, c []float32, ldc int) {
	t.Helper()
	m, k, n := a.Rows, a.Cols, b.Cols
	if m == 0 || n == 0 || k == 0 {
		for i := range m {
			for j := range n {
				require.Zero(t, math.Float32bits(c[i*ldc+j]), "an empty sum is +0")
			}
		}
		return
	}
	to64 := func(x Matrix) blas64.General {
		g := blas64.General{Rows: x.Rows, Cols: x.Cols, Stride: x.Cols, Data: make([]float64, x.Rows*x.Cols)}
		for i := range x.Rows {
			for j := range x.Cols {
				g.Data[i*x.Cols+j] = float64(x.at(i, j))
			}
		}
		return g
	}
	abs := func(g blas64.General) blas64.General {
		h := blas64.General{Rows: g.Rows, Cols: g.Cols, Stride: g.Stride, Data: make([]float64, len(g.Data))}
		for i, v := range g.Data {
			h.Data[i] = math.Abs(v)
		}
		return h
	}
	a64, b64 := to64(a), to64(b)
	want := blas64.General{Rows: m, Cols: n, Stride: n, Data: make([]float64, m*n)}
	bound := blas64.General{Rows: m, Cols: n, Stride: n, Data: make([]float64, m*n)}
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1, a64, b64, 0, want)
	blas64.Gemm(blas.NoTrans, blas.NoTrans, 1, abs(a64), abs(b64), 0, bound)
	u := math.Ldexp(1, -24)
	for i := range m {
		for j := range n {
			d := math.Abs(float64(c[i*ldc+j]) - want.Data[i*n+j])
			tol := float64(k)*u*bound.Data[i*n+j]*1.01 + 1e-300
			require.LessOrEqual(t, d, tol, "entry (%d, %d) of a %d x %d x %d product vs gonum", i, j, m, n, k)
		}
	}
}

// Every set has a micro-kernel and a peak loop, and the peak loop runs.
func TestGemmAndPeakSetsComplete(t *testing.T) {
	for _, k := range kernelSets {
		require.Contains(t, gemmKernels, k.name)
		require.Contains(t, gemm64Kernels, k.name)
		require.Contains(t, peakLoops, k.name)
	}
	for _, k := range runnableSets(t) {
		for _, f64 := range []bool{false, true} {
			r, err := PeakFMA(k.name, f64, 1, time.Millisecond)
			require.NoError(t, err)
			require.Greater(t, r.Wall, 0.0, k.name)
		}
	}
}

// The kernel's rate against the peak on a product of E1's sketch's shape
// (go test -bench Gemm32 ./gomerge/kernels).
func BenchmarkGemm32(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 1))
	m, n, k := 84, 2048, 5632
	a, bm := matrix(rng, m, k, true), matrix(rng, k, n, false)
	c := make([]float32, m*n)
	for _, name := range Runnable() {
		b.Run(name, func(b *testing.B) {
			for range b.N {
				_ = Gemm32With(name, 2, a, bm, c, n)
			}
			b.ReportMetric(2*float64(m*n*k)*float64(b.N)/b.Elapsed().Seconds()/1e9, "GFLOP/s")
		})
	}
}

// BenchmarkGemm32vsPeak: one thread, the product's rate and the peak rate
// measured one after the other.
func BenchmarkGemm32vsPeak(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 1))
	m, n, k := 84, 2048, 2048
	a, bm := matrix(rng, m, k, true), matrix(rng, k, n, false)
	c := make([]float32, m*n)
	for _, name := range Runnable()[1:] {
		b.Run(name, func(b *testing.B) {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			c0 := cpuSeconds(true)
			for range b.N {
				_ = Gemm32With(name, 1, a, bm, c, n)
			}
			b.ReportMetric(2*float64(m*n*k)*float64(b.N)/(cpuSeconds(true)-c0)/1e9, "GFLOP/cpu-s")
			p, _ := PeakFMA(name, false, 1, 300*time.Millisecond)
			b.ReportMetric(p.CPU/1e9, "peakGFLOP/cpu-s")
		})
	}
}

// A product takes its packing buffers and edge tiles from the pool: the
// Gram route of the SVD runs thousands of small products, and a fresh,
// cleared 200 KiB block of A per call (or an 8 KiB tile per block, which
// escaped to the heap through the micro-kernel's function value) cost
// more than their arithmetic. 200 calls allocate less than 4 KiB each on
// average (the views and closures of a call take a few hundred bytes; a
// collection that empties the pool costs one block, 1 KiB a call here).
// The race detector's sync.Pool drops a quarter of what is put back, so
// under it (make test's -race runs) the count says nothing; the other runs
// of the same test binary's code, natively and on every emulated CPU level,
// check it.
func TestGemmReusesBuffers(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector's sync.Pool drops buffers at random")
	}
	x := make([]float64, 24*2048)
	for i := range x {
		x[i] = float64(i%7) - 3
	}
	a := Matrix64{Rows: 24, Cols: 2048, Stride: 2048, Data: x}
	c := make([]float64, 24*24)
	for _, set := range Runnable() {
		require.NoError(t, Gemm64With(set, 1, a, a.Transposed(), c, 24))
		var before, after runtime.MemStats
		runtime.ReadMemStats(&before)
		const calls = 200
		for range calls {
			require.NoError(t, Gemm64With(set, 1, a, a.Transposed(), c, 24))
		}
		runtime.ReadMemStats(&after)
		perCall := float64(after.TotalAlloc-before.TotalAlloc) / calls
		assert.Less(t, perCall, 4096.0, "%s: bytes allocated per product", set)
	}
}
