//go:build !amd64 || amd64.v3

package kernels

// fusedMultiplyAdd: the Go compiler may fuse x*y + z into one rounding
// (arm64, ppc64, s390x, riscv64, and amd64 built for v3), which the spec
// allows, so a portable kernel and a reference in Go agree only to the
// last bits here.
const fusedMultiplyAdd = true
