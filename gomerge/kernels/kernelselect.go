package kernels

import (
	"fmt"
	"os"
	"runtime"
	"strings"

	"gomerge/gomerge/errs"
)

// Env is the environment variable that forces a kernel set: "go"
// (portable), "avx2" or "avx512". Unset, empty or "auto", the fastest set
// that this CPU runs is used.
const Env = "GOMERGE_KERNELS"

// kernelNames are the kernel sets of every build, slowest first.
var kernelNames = []string{"go", "avx2", "avx512"}

// envErr is why the set that Env asks for cannot run here.
var envErr error

// The set is chosen once, before any kernel runs: package initialisation
// executes no vector instruction (the vector constants live in the
// kernels' own frames), so a CPU without AVX2 or AVX-512 starts the engine
// and runs the portable kernels.
func init() {
	k, err := chooseKernels(os.Getenv(Env))
	active = k
	if err != nil {
		envErr = errs.Value("%s", err)
	}
}

// InUse names the kernel set in use: "go", "avx2" or "avx512".
func InUse() string { return active.name }

// Err returns the error of an Env request that this build or CPU cannot
// honour (a ValueError naming the missing CPU features), or nil. While it
// is set the portable kernels are in use, and the bindings refuse to run
// merges, fuses and extractions.
func Err() error { return envErr }

// Runnable names the kernel sets of this build that this CPU runs, slowest
// first.
func Runnable() []string {
	var names []string
	for _, k := range kernelSets {
		if len(k.missing()) == 0 {
			names = append(names, k.name)
		}
	}
	return names
}

// chooseKernels returns the set that want names ("" or "auto": the fastest
// one this CPU runs), or the portable set and an error saying why want
// cannot run.
func chooseKernels(want string) (kernels, error) {
	want = strings.ToLower(strings.TrimSpace(want))
	if want == "" || want == "auto" {
		best := kernelSets[0]
		for _, k := range kernelSets {
			if len(k.missing()) == 0 {
				best = k
			}
		}
		return best, nil
	}
	runnable := strings.Join(Runnable(), ", ")
	for _, k := range kernelSets {
		if k.name != want {
			continue
		}
		if m := k.missing(); len(m) > 0 {
			return portableKernels, fmt.Errorf("%s=%s: this CPU lacks %s, which the %s kernels need; unset %s or choose one of: %s",
				Env, want, strings.Join(m, ", "), want, Env, runnable)
		}
		return k, nil
	}
	for _, name := range kernelNames {
		if name != want {
			continue
		}
		why := "this engine was built without Go's SIMD experiment (GOEXPERIMENT=simd)"
		if runtime.GOARCH != "amd64" {
			why = fmt.Sprintf("they are x86-64 kernels and this engine runs on %s", runtime.GOARCH)
		}
		return portableKernels, fmt.Errorf("%s=%s: this engine has no %s kernels: %s; unset %s or choose one of: %s",
			Env, want, want, why, Env, runnable)
	}
	return portableKernels, fmt.Errorf("%s=%q is not a kernel set: choose one of %s (or auto)",
		Env, want, strings.Join(kernelNames, ", "))
}
