//go:build !(goexperiment.simd && amd64)

package kernels

// vectorKernels: a build without Go's SIMD experiment, or for a CPU
// architecture other than amd64, has the portable kernels only.
var vectorKernels []kernels
