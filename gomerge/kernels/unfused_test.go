//go:build amd64 && !amd64.v3

package kernels

// fusedMultiplyAdd: on amd64 below v3 the compiler never fuses x*y + z, and
// gonum's Sdot and Saxpy are SSE code with one rounding per operation: the
// portable kernels reproduce them bit for bit.
const fusedMultiplyAdd = false
