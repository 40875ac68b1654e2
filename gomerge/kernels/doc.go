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
//   - kernels_simd.go, kernels_avx512.go, kernels_novec.go: the AVX2 and AVX-512 sets (or none)
//   - kernelselect.go: the choice of the set (InUse, Runnable, Err, GOMERGE_KERNELS)
//   - threshold.go: the k-th largest magnitude in O(n) (PEFT's magnitude pruning threshold)
//   - elect.go: PEFT's sign election and disjoint merge, the references of the TIES kernels
//   - half.go: the portable BF16 / F16 conversions
//
// It imports nothing from package gomerge; its errors are plain, and package
// gomerge gives them their kinds.
package kernels
