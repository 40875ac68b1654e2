//go:build !linux

package kernels

// cpuSeconds is 0 where the CPU time of a thread is not read: the rates
// are then measured on the wall clock only.
func cpuSeconds(bool) float64 { return 0 }
