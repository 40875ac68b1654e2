//go:build goexperiment.simd && amd64

package kernels

import "unsafe"

// The vector micro-kernels of Gemm32 and Gemm64 (gemm.go), in assembly
// (asm_amd64.s, written by internal/genasm: see there why): a 6 x 16
// float32 tile on AVX2 (6 x 8 in float64) and a 12 x 32 tile on AVX-512
// (12 x 16 in float64). Each step p is one fused multiply-add per entry, so
// each entry is the chain of gemm.go in order. The sets register them here.
func init() {
	gemmKernels["avx2"] = gemmKernel[float32]{mr: 6, nr: 16, micro: asmMicro[float32](6, 16, gemm32AVX2)}
	gemmKernels["avx512"] = gemmKernel[float32]{mr: 12, nr: 32, micro: asmMicro[float32](12, 32, gemm32AVX512)}
	gemm64Kernels["avx2"] = gemmKernel[float64]{mr: 6, nr: 8, micro: asmMicro[float64](6, 8, gemm64AVX2)}
	gemm64Kernels["avx512"] = gemmKernel[float64]{mr: 12, nr: 16, micro: asmMicro[float64](12, 16, gemm64AVX512)}
}

// The assembly micro-kernels: C's tile (row stride ldc values) from +0
// (first) or from its values, plus kc steps of A (mr values a step, lda
// values apart: a packed strip, or a transposed A's own rows) and of the
// packed strip bp (nr values a step).
//
//go:noescape
func gemm32AVX2(kc int, ap unsafe.Pointer, lda int, bp, c unsafe.Pointer, ldc int, first bool)

//go:noescape
func gemm64AVX2(kc int, ap unsafe.Pointer, lda int, bp, c unsafe.Pointer, ldc int, first bool)

//go:noescape
func gemm32AVX512(kc int, ap unsafe.Pointer, lda int, bp, c unsafe.Pointer, ldc int, first bool)

//go:noescape
func gemm64AVX512(kc int, ap unsafe.Pointer, lda int, bp, c unsafe.Pointer, ldc int, first bool)

// asmMicro wraps an assembly micro-kernel of an mr x nr tile: the slices'
// lengths are checked here (a panic, never a read or write past them).
func asmMicro[T float32 | float64](mr, nr int, f func(kc int, ap unsafe.Pointer, lda int, bp, c unsafe.Pointer, ldc int, first bool)) func(kc int, ap []T, lda int, bp, c []T, ldc int, first bool) {
	return func(kc int, ap []T, lda int, bp, c []T, ldc int, first bool) {
		if kc < 1 || lda < mr || len(ap) < (kc-1)*lda+mr || len(bp) < nr*kc || ldc < nr || len(c) < (mr-1)*ldc+nr {
			panic("kernels: micro-kernel operands too short")
		}
		f(kc, unsafe.Pointer(unsafe.SliceData(ap)), lda, unsafe.Pointer(unsafe.SliceData(bp)), unsafe.Pointer(unsafe.SliceData(c)), ldc, first)
	}
}
