package gomerge

import "gomerge/gomerge/kernels"

// KernelsEnv is the environment variable that forces a kernel set: "go"
// (portable), "avx2" or "avx512". Unset, empty or "auto", the fastest set
// that this CPU runs is used.
const KernelsEnv = kernels.Env

// KernelSet names the kernels in use: "go", "avx2" or "avx512" (chosen once,
// at start-up, by package kernels).
var KernelSet = kernels.InUse()

// kernelsErr is kernels.Err as a ValueError.
var kernelsErr = asValueErr(kernels.Err())

// KernelsError returns the error of a KernelsEnv request that this build or
// CPU cannot honour (a ValueError naming the missing CPU features), or nil.
// While it is set the portable kernels are in use, and merges refuse to run.
func KernelsError() error { return kernelsErr }

// RunnableKernels names the kernel sets of this build that this CPU runs,
// slowest first.
func RunnableKernels() []string { return kernels.Runnable() }

// asValueErr gives err (nil stays nil) the kind KindValue, keeping its
// message.
func asValueErr(err error) error {
	if err == nil {
		return nil
	}
	return &Error{Kind: KindValue, Msg: err.Error()}
}
