package kernels

import (
	"fmt"
	"math"
	"math/rand/v2"
	"os"
	"reflect"
	"runtime"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// kernelInputs are tensors that exercise the kernels' edge cases: lengths
// off the vector width, signed zeros, equal magnitudes and, unless finite,
// NaN and Inf.
func kernelInputs(rng *rand.Rand, tensors, n int, finite bool) [][]float32 {
	ts := make([][]float32, tensors)
	for i := range ts {
		ts[i] = make([]float32, n)
		for j := range ts[i] {
			switch r := rng.IntN(40); {
			case r == 0:
				ts[i][j] = float32(math.Copysign(0, -1))
			case r == 1:
				ts[i][j] = 0
			case r == 2:
				ts[i][j] = 0.5 * float32(1-2*rng.IntN(2)) // many equal magnitudes
			case r == 3 && !finite:
				ts[i][j] = []float32{float32(math.NaN()), float32(math.Inf(1)), float32(math.Inf(-1))}[rng.IntN(3)]
			default:
				ts[i][j] = float32(rng.NormFloat64())
			}
		}
	}
	return ts
}

func sameBits(t *testing.T, want, got []float32, msg string) {
	t.Helper()
	require.Len(t, got, len(want), msg)
	for j := range want {
		if math.Float32bits(want[j]) != math.Float32bits(got[j]) && !(want[j] != want[j] && got[j] != got[j]) {
			t.Fatalf("%s: element %d: want %v, got %v", msg, j, want[j], got[j])
		}
	}
}

// sameAsReference is sameBits where multiply-adds are never fused
// (fusedMultiplyAdd false); elsewhere the portable kernels and references
// written in Go (or gonum's Go fallbacks) may round a product and a sum
// once or twice, and agree within a few ulps of the largest operand.
func sameAsReference(t *testing.T, want, got []float32, msg string) {
	t.Helper()
	if !fusedMultiplyAdd {
		sameBits(t, want, got, msg)
		return
	}
	require.Len(t, got, len(want), msg)
	scale := float32(0)
	for _, w := range want {
		if a := float32(math.Abs(float64(w))); a > scale && !math.IsInf(float64(a), 0) {
			scale = a
		}
	}
	for j := range want {
		if want[j] != want[j] && got[j] != got[j] || want[j] == got[j] {
			continue
		}
		if d := math.Abs(float64(want[j]) - float64(got[j])); !(d <= 8*float64(scale)*0x1p-23) {
			t.Fatalf("%s: element %d: want %v, got %v (beyond the rounding of fused multiply-adds)", msg, j, want[j], got[j])
		}
	}
}

// kernelReport collects, for the summary that TestMain prints, which vector
// kernels the tests compared with the portable ones and which sets this CPU
// could not run.
var kernelReport struct {
	sync.Mutex
	compared map[string]bool // "set kernel"
	notRun   map[string]string
}

func TestMain(m *testing.M) {
	code := m.Run()
	kernelReport.Lock()
	var compared, notRun []string
	for k := range kernelReport.compared {
		compared = append(compared, k)
	}
	for set, why := range kernelReport.notRun {
		notRun = append(notRun, set+" (this CPU lacks "+why+")")
	}
	kernelReport.Unlock()
	slices.Sort(compared)
	slices.Sort(notRun)
	fmt.Printf("kernels: %s/%s, in use %s; kernels compared with their references: %s; sets not run here: %s\n",
		runtime.GOOS, runtime.GOARCH, active.name, orNone(compared), orNone(notRun))
	os.Exit(code)
}

func orNone(s []string) string {
	if len(s) == 0 {
		return "none"
	}
	return strings.Join(s, ", ")
}

// runnableSets returns the kernel sets of this build that this CPU runs,
// noting the others for the summary.
func runnableSets(t *testing.T) []kernels {
	var sets []kernels
	for _, k := range kernelSets {
		if m := k.missing(); len(m) > 0 {
			t.Logf("%s kernels not run: this CPU lacks %s", k.name, strings.Join(m, ", "))
			kernelReport.Lock()
			if kernelReport.notRun == nil {
				kernelReport.notRun = map[string]string{}
			}
			kernelReport.notRun[k.name] = strings.Join(m, ", ")
			kernelReport.Unlock()
			continue
		}
		sets = append(sets, k)
	}
	return sets
}

// ownKernel reports whether set k has its own version of a kernel (f, the
// portable one being portable; nil when every set, the portable one
// included, is compared with a reference), recording it as compared; sets
// that reuse the portable function are not compared with themselves.
func ownKernel(t *testing.T, k kernels, kernel string, f, portable any) bool {
	if portable != nil && reflect.ValueOf(f).Pointer() == reflect.ValueOf(portable).Pointer() {
		if k.name != "go" {
			t.Logf("%s kernels use the portable %s", k.name, kernel)
		}
		return false
	}
	kernelReport.Lock()
	if kernelReport.compared == nil {
		kernelReport.compared = map[string]bool{}
	}
	kernelReport.compared[k.name+" "+kernel] = true
	kernelReport.Unlock()
	return true
}

// expectedKernels is the kernel set that the engine must choose here: the
// one GOMERGE_EXPECT_KERNELS names (the Makefile sets it for each emulated
// CPU level, where /proc/cpuinfo shows the host's CPU), else the fastest
// one that /proc/cpuinfo's flags allow for this build.
func expectedKernels(t *testing.T) string {
	if want := os.Getenv("GOMERGE_EXPECT_KERNELS"); want != "" {
		t.Logf("expected kernels from GOMERGE_EXPECT_KERNELS: %s", want)
		return want
	}
	if want := os.Getenv(Env); want != "" {
		return want
	}
	if len(kernelSets) == 1 {
		return "go"
	}
	info, err := os.ReadFile("/proc/cpuinfo")
	require.NoError(t, err)
	var flags []string
	for _, line := range strings.Split(string(info), "\n") {
		if name, value, ok := strings.Cut(line, ":"); ok && strings.TrimSpace(name) == "flags" {
			flags = strings.Fields(value)
			break
		}
	}
	has := func(names ...string) bool {
		for _, n := range names {
			if !slices.Contains(flags, n) {
				return false
			}
		}
		return true
	}
	switch {
	case has("avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl"):
		return "avx512"
	case has("avx", "avx2"):
		return "avx2"
	}
	return "go"
}

// Every set of this build has every kernel: a set is a struct literal with
// named fields, and a field it leaves out would be nil.
func TestKernelSetsComplete(t *testing.T) {
	for _, k := range kernelSets {
		v := reflect.ValueOf(k)
		for i := range v.NumField() {
			if f := v.Field(i); f.Kind() == reflect.Func {
				assert.False(t, f.IsNil(), "the %s kernels have no %s", k.name, v.Type().Field(i).Name)
			}
		}
		assert.NotEmpty(t, k.name)
	}
	assert.Equal(t, "go", kernelSets[0].name, "the portable set comes first")
}

// The set in use is the one this CPU level calls for.
func TestKernelSetForCPU(t *testing.T) {
	want := expectedKernels(t)
	assert.Equal(t, want, InUse())
	assert.NoError(t, Err())
	assert.Equal(t, want, Runnable()[len(Runnable())-1], "the fastest set this CPU runs")
}

// GOMERGE_KERNELS: every set this CPU runs can be forced; one it cannot run
// is an error naming the missing features; unknown names are refused.
func TestChooseKernels(t *testing.T) {
	runnable := Runnable()
	best, err := chooseKernels("")
	require.NoError(t, err)
	assert.Equal(t, runnable[len(runnable)-1], best.name)
	best, err = chooseKernels("auto")
	require.NoError(t, err)
	assert.Equal(t, runnable[len(runnable)-1], best.name)
	for _, name := range kernelNames {
		k, err := chooseKernels(strings.ToUpper(name))
		inBuild := slices.ContainsFunc(kernelSets, func(k kernels) bool { return k.name == name })
		switch {
		case slices.Contains(runnable, name):
			require.NoError(t, err, name)
			assert.Equal(t, name, k.name)
		case inBuild:
			require.Error(t, err, name)
			assert.Contains(t, err.Error(), "this CPU lacks avx")
			assert.Equal(t, "go", k.name, "the portable kernels while the request is refused")
		default:
			require.Error(t, err, name)
			assert.Contains(t, err.Error(), "this engine has no "+name+" kernels")
			assert.Equal(t, "go", k.name)
		}
	}
	_, err = chooseKernels("sse4")
	require.Error(t, err)
	assert.Contains(t, err.Error(), `GOMERGE_KERNELS="sse4" is not a kernel set`)
}

// Every kernel set this CPU runs (vector ones when the engine is built with
// GOEXPERIMENT=simd) against the portable versions, and the TIES kernels
// (the portable one included) against tiesPEFT.
func TestKernelsAgree(t *testing.T) {
	sets := runnableSets(t)
	rng := rand.New(rand.NewPCG(7, 7))
	for _, tc := range []struct {
		name      string
		tensors   int
		n         int
		finite    bool
		density   float64
		frequency bool
	}{
		{"empty", 3, 0, true, 0.2, false},
		{"one element", 2, 1, true, 0.5, false},
		{"below a vector", 3, 7, true, 0.5, true},
		{"vector and tail", 3, 13, true, 0.2, false},
		{"block and tail", 3, kernelBlock + 9, true, 0.2, true},
		{"blocks, 16-lane tail", 5, 2*kernelBlock + 24, true, 0.2, false},
		{"many tensors", 8, 3001, true, 0.3, false},
		{"keep all", 3, 100, true, 1, false},
		{"keep none", 3, 100, true, 0.001, true},
		{"non-finite", 3, 517, false, 0.2, false},
		{"non-finite frequency", 4, 517, false, 0.5, true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ts := kernelInputs(rng, tc.tensors, tc.n, tc.finite)
			w := make([]float32, tc.tensors)
			thr := make([]uint32, tc.tensors)
			pruned := make([][]float32, tc.tensors)
			for i := range w {
				w[i] = float32(rng.NormFloat64())
				if tc.n > 0 {
					thr[i], _, _ = MagnitudeThreshold(ts[i], tc.density)
				}
				pruned[i] = make([]float32, tc.n)
				for j, v := range ts[i] {
					pruned[i][j] = KeepAbove(v, thr[i])
				}
			}
			method := SignTotal
			if tc.frequency {
				method = SignFrequency
			}
			// the kernels' TIES against PEFT's definition, written out per element; and the package's own
			// composed primitives (DisjointMerge, ElectSigns) against it too
			wantTies := tiesPEFT(ts, thr, w, tc.frequency)
			if tc.n > 0 {
				sameBits(t, wantTies, DisjointMerge(pruned, w, ElectSigns(pruned, method)), "composed primitives")
			}
			wantSum := make([]float32, tc.n)
			prunedSumIntoGo(wantSum, ts, thr, w)
			for _, k := range sets {
				got := make([]float32, tc.n)
				ownKernel(t, k, "tiesInto", k.tiesInto, nil)
				k.tiesInto(got, ts, thr, w, tc.frequency)
				sameBits(t, wantTies, got, k.name+" ties")
				if ownKernel(t, k, "prunedSumInto", k.prunedSumInto, prunedSumIntoGo) {
					k.prunedSumInto(got, ts, thr, w)
					sameBits(t, wantSum, got, k.name+" pruned sum")
				}
				if ownKernel(t, k, "maxAbsBits", k.maxAbsBits, maxAbsBitsGo) {
					for i := range ts {
						assert.Equal(t, maxAbsBitsGo(ts[i]), k.maxAbsBits(ts[i]), "%s max magnitude", k.name)
					}
				}
			}
		})
	}
}

// tiesPEFT is PEFT's ties() (peft/utils/merge_utils.py: prune, then
// calculate_majority_sign_mask, the weighting and disjoint_merge) written out
// per element in float32 from its definition, sharing no code with the
// kernels: pruning keeps the values whose magnitude's bits are at least the
// tensor's threshold (magnitude pruning's top-k); the elected sign is +1
// where the sum of the pruned values (or of their torch.sign) is >= 0, else
// -1 (a NaN vote gives -1, as torch.where does); the result is
// sum_i (v_i w_i) [sign(v_i) == elected] / max(count, 1), the masked products
// included as zeros (so Inf * 0 gives NaN, as in PEFT). Sums run over the
// tensors in order; explicit float32 conversions keep the products unfused.
func tiesPEFT(ts [][]float32, thr []uint32, w []float32, frequency bool) []float32 {
	n := 0
	if len(ts) > 0 {
		n = len(ts[0])
	}
	torchSign := func(v float32) float32 {
		switch {
		case v > 0:
			return 1
		case v < 0:
			return -1
		case v == 0:
			return 0
		}
		return v // NaN
	}
	out := make([]float32, n)
	pruned := make([]float32, len(ts))
	for j := range out {
		var vote float32
		for i, t := range ts {
			v := t[j]
			if math.Float32bits(v)&0x7fffffff < thr[i] {
				v = 0
			}
			pruned[i] = v
			if frequency {
				vote += torchSign(v)
			} else {
				vote += v
			}
		}
		elected := float32(-1)
		if vote >= 0 {
			elected = 1
		}
		var sum, count float32
		for i, v := range pruned {
			var mask float32
			if torchSign(v) == elected {
				mask = 1
			}
			sum += float32(float32(v*w[i]) * mask)
			count += mask
		}
		out[j] = sum / max(count, 1)
	}
	return out
}

func TestAbsBand(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 3))
	x := kernelInputs(rng, 1, 1001, true)[0]
	lo, hi := math.Float32bits(0.5), math.Float32bits(1.5)
	for _, k := range runnableSets(t) {
		if !ownKernel(t, k, "absBand", k.absBand, absBandGo) {
			continue
		}
		for _, size := range []int{1001 + 16, 30} {
			c1, c2 := make([]uint32, size), make([]uint32, size)
			a1, n1 := absBandGo(x, lo, hi, c1)
			a2, n2 := k.absBand(x, lo, hi, c2)
			require.Equal(t, n1 < 0, n2 < 0, "%s: overflow agrees (buffer %d)", k.name, size)
			if n1 >= 0 {
				assert.Equal(t, a1, a2, k.name)
				assert.Equal(t, c1[:n1], c2[:n2], k.name)
			}
		}
	}
}

// The sampled band must find the exact threshold on the spectra it sees,
// and fall back to the histogram when it misses (an adversarial layout: the
// sample sees only zeros).
func TestKthLargestAbsBits(t *testing.T) {
	rng := rand.New(rand.NewPCG(5, 5))
	lowRankA, lowRankB := make([]float32, 64), make([]float32, 1024)
	for i := range lowRankA {
		lowRankA[i] = float32(rng.NormFloat64())
	}
	for i := range lowRankB {
		lowRankB[i] = float32(rng.NormFloat64())
	}
	for _, tc := range []struct {
		name string
		gen  func(i int) float32
	}{
		{"normal", func(int) float32 { return float32(rng.NormFloat64()) }},
		{"heavy tail", func(int) float32 { return float32(rng.NormFloat64() / (rng.Float64() + 1e-3)) }},
		{"few values", func(int) float32 { return float32(rng.IntN(5)) }},
		{"sample misses", func(int) float32 { return float32(rng.NormFloat64()) }}, // then zeros where the sample reads
		// a rank-one delta b a^T in rows of 64: a sample from one column sees |a_0| times the |b_i|, not the spread
		{"low rank", func(i int) float32 { return lowRankA[i%64] * lowRankB[(i/64)%len(lowRankB)] }},
	} {
		for _, n := range []int{bandMinLen - 1, bandMinLen, 70001} {
			x := make([]float32, n)
			for i := range x {
				x[i] = tc.gen(i)
			}
			if tc.name == "sample misses" && n >= bandMinLen {
				s := min(2048, max(256, n>>6))
				for i := range s {
					x[sampleIndex(i, n, s)] = 0
				}
			}
			for _, density := range []float64{0.01, 0.2, 0.9} {
				k := PruneK(density, n)
				thr, above, equal, banded := kthLargestAbsBitsBanded(x, k)
				switch {
				case n < bandMinLen:
					assert.False(t, banded, "%s n=%d: too small to sample", tc.name, n)
				case tc.name == "sample misses":
					assert.False(t, banded, "%s n=%d density=%v: the histogram fallback ran", tc.name, n, density)
				case tc.name == "normal", tc.name == "low rank":
					assert.True(t, banded, "%s n=%d density=%v: the sampled band held the k-th value", tc.name, n, density)
				}
				var gt, eq int
				for _, v := range x {
					switch b := math.Float32bits(v) & 0x7fffffff; {
					case b > thr:
						gt++
					case b == thr:
						eq++
					}
				}
				assert.Equal(t, gt, above, "%s n=%d density=%v", tc.name, n, density)
				assert.Equal(t, eq, equal, "%s n=%d density=%v", tc.name, n, density)
				assert.True(t, gt < k && gt+eq >= k, "%s n=%d density=%v: the k-th largest", tc.name, n, density)
			}
		}
	}
}

func BenchmarkKthLargestAbsBits(b *testing.B) {
	for _, n := range []int{16384, 704512} {
		rng := rand.New(rand.NewPCG(1, 1))
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		b.Run(strconv.Itoa(n), func(b *testing.B) {
			b.SetBytes(int64(4 * n))
			for b.Loop() {
				KthLargestAbsBits(x, n/5)
			}
		})
	}
}

func BenchmarkTiesInto(b *testing.B) {
	rng := rand.New(rand.NewPCG(1, 1))
	ts := kernelInputs(rng, 3, 1<<16, true)
	out := make([]float32, 1<<16)
	thr := []uint32{math.Float32bits(1), math.Float32bits(1), math.Float32bits(1)}
	w := []float32{1, 1, 1}
	b.SetBytes(int64(3 * 4 << 16))
	for b.Loop() {
		active.tiesInto(out, ts, thr, w, false)
	}
}

// Every half-precision pattern decodes, and float32 values of every kind
// (zeros, subnormal and normal halves, half-way cases, overflow, Inf, NaN)
// encode, as the portable conversions do.
func TestHalfKernels(t *testing.T) {
	all := make([]uint16, 1<<16+5) // a tail off the vector width
	for i := range all {
		all[i] = uint16(i)
	}
	rng := rand.New(rand.NewPCG(11, 11))
	x := make([]float32, 1<<18+7)
	for i := range x {
		b := rng.Uint32()&0x807fffff | (95+rng.Uint32N(161-95))<<23
		switch i % 8 {
		case 0:
			b = b&^0x1fff | 0x1000 // half way between halves
		case 1:
			b = b&^0xffff | 0x8000 // half way between bfloat16s
		case 2:
			b &= 0x80000000
		}
		x[i] = math.Float32frombits(b)
	}
	compared := 0
	for _, k := range runnableSets(t) {
		for _, bf16 := range []bool{false, true} {
			if ownKernel(t, k, "decodeHalf", k.decodeHalf, decodeHalfGo) {
				compared++
				want, got := make([]float32, len(all)), make([]float32, len(all))
				decodeHalfGo(want, all, bf16)
				k.decodeHalf(got, all, bf16)
				for i := range want {
					require.Equal(t, math.Float32bits(want[i]), math.Float32bits(got[i]), "%s decode %#04x (bf16 %v)", k.name, all[i], bf16)
				}
			}
			if ownKernel(t, k, "encodeHalf", k.encodeHalf, encodeHalfGo) {
				compared++
				wantH, gotH := make([]uint16, len(x)), make([]uint16, len(x))
				encodeHalfGo(wantH, x, bf16)
				k.encodeHalf(gotH, x, bf16)
				for i := range wantH {
					require.Equal(t, wantH[i], gotH[i], "%s encode %#08x (bf16 %v)", k.name, math.Float32bits(x[i]), bf16)
				}
			}
		}
	}
	if compared == 0 {
		t.Skip("no kernel set that this CPU runs has half-precision conversions of its own (the portable ones are the reference)")
	}
}
