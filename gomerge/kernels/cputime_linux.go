package kernels

import "golang.org/x/sys/unix"

// cpuSeconds is the CPU time (user + system) of the calling OS thread
// (thread) or of the process, in seconds: rates measured by it do not
// depend on other processes sharing the cores.
func cpuSeconds(thread bool) float64 {
	who := unix.RUSAGE_SELF
	if thread {
		who = unix.RUSAGE_THREAD
	}
	var ru unix.Rusage
	if unix.Getrusage(who, &ru) != nil {
		return 0
	}
	return float64(ru.Utime.Nano()+ru.Stime.Nano()) / 1e9
}
