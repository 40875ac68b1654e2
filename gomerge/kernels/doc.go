// Package kernels holds gomerge's element-wise kernels: magnitude pruning by
// thresholds, TIES (sign election and disjoint merge) and pruned weighted
// sums, the maximum magnitude of a tensor, and the BF16 / F16 conversions,
// in portable Go and, when built with GOEXPERIMENT=simd for amd64, in AVX2
// and AVX-512 vectors, with bit-identical results. The set in use is chosen
// once, at start-up, from the CPU (GOMERGE_KERNELS forces one); the exported
// functions call it.
//
// The package is organised one concept per file:
//
//   - kernels.go: the kernels in use, their portable versions and the exported entry points
//   - kernels_simd.go: the vector sets of the build and the AVX2 kernels that are AVX2's own
//   - kernels_avx2.go: the vector kernels written once for every width, at AVX2's 8 lanes
//   - kernels_avx512_gen.go: those kernels at AVX-512's 16 lanes, generated from kernels_avx2.go
//     by internal/gen512 (go generate ./gomerge/kernels; make lint checks that it is up to date)
//   - kernels_avx512.go: the AVX-512 kernels that are AVX-512's own (compress, half conversions)
//   - dots_simd.go, gta_simd.go: the AVX2 dot products, row updates and GTA, used by both sets
//   - kernels_novec.go: no vector sets (a build without GOEXPERIMENT=simd, or not for amd64)
//   - kernelselect.go: the choice of the set (InUse, Runnable, Err, GOMERGE_KERNELS)
//   - threshold.go: the k-th largest magnitude in O(n) (PEFT's magnitude pruning threshold)
//   - elect.go: PEFT's sign election and disjoint merge, the references of the TIES kernels
//   - half.go: the portable BF16 / F16 conversions
//   - gemm.go, gemm_simd.go: the blocked float32 / float64 matrix product (Gemm32, Gemm64) of the SVDs:
//     packing, and a register-blocked fused multiply-add micro-kernel per set, the same bits on every set
//   - peak.go, peak_simd.go: the peak fused multiply-add rate of each set (PeakFMA), the benchmarks' yardstick
//   - cputime_linux.go, cputime_other.go: a thread's CPU time, for rates that other processes do not change
//
// It imports nothing from package gomerge; its errors are plain, and package
// gomerge gives them their kinds.
package kernels

// The AVX-512 kernels that are the AVX2 ones at twice the width (a file
// outside the vector build, so that go generate runs in every build).
//go:generate go run ./internal/gen512
