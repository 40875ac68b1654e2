//go:build goexperiment.simd && amd64

package kernels

// The vector sets' peak loops (peak.go), in assembly (asm_amd64.s, written
// by internal/genasm): 12 independent chains of vector multiply-adds
// c = c*a + a. In Go, the compiler merged chains that started equal into one
// (common subexpressions), which ran at its latency, not at the pipes' rate.
func init() {
	peakLoops["avx2"] = [2]peakLoop{asmPeak(peak32AVX2, 8), asmPeak(peak64AVX2, 4)}
	peakLoops["avx512"] = [2]peakLoop{asmPeak(peak32AVX512, 16), asmPeak(peak64AVX512, 8)}
}

// The assembly peak loops: iters steps of peakChains chains; sink is one
// lane of their sum (it keeps the work observable).
func peak32AVX2(iters int) (sink float64)
func peak64AVX2(iters int) (sink float64)
func peak32AVX512(iters int) (sink float64)
func peak64AVX512(iters int) (sink float64)

// peakChains is the chains of each assembly peak loop (internal/genasm).
const peakChains = 12

// asmPeak is a peakLoop of an assembly loop of lanes values per vector.
func asmPeak(f func(int) float64, lanes int) peakLoop {
	return func(iters int) (float64, float64) {
		return 2 * peakChains * float64(lanes) * float64(iters), f(iters)
	}
}
