package methods

import (
	"math"

	"gomerge/gomerge/kernels"
)

// OutlierCounts are mergekit's counts for magnitude_outliers (Model
// Breadcrumbs) over n entries: target_n = int(density * n) entries are
// kept, after dropping the n_top = int(gamma * n) largest magnitudes, so
// n_bot = max(0, n - target_n - n_top) smallest are dropped. When
// density + gamma > 1 the outlier removal shrinks to keep target_n.
func OutlierCounts(n int, density, gamma float64) (nBot, targetN int) {
	targetN = int(density * float64(n))
	nTop := int(gamma * float64(n))
	return max(0, n-targetN-nTop), targetN
}

// MagnitudeOutliers is mergekit's magnitude_outliers sparsification, in
// place and without rescaling: with the entries of t sorted by ascending
// magnitude, those at positions [n_bot, n_bot + target_n) are kept and the
// others zeroed (OutlierCounts). Entries of equal magnitude are ordered by
// their index (a stable sort; torch's unstable sort orders them
// arbitrarily). density >= 1 keeps t as it is, as mergekit does. The two
// cut-offs are found by selection, in O(n).
func MagnitudeOutliers(t []float32, density, gamma float64) {
	if density >= 1 {
		return
	}
	n := len(t)
	nBot, targetN := OutlierCounts(n, density, gamma)
	if targetN <= 0 {
		clear(t)
		return
	}
	end := nBot + targetN // the first ascending position dropped at the top
	// loThr: the magnitude at ascending position nBot (0 when nothing is dropped at the bottom), loBelow the
	// number of entries below it; hiThr: the magnitude at position end-1 (above everything when nothing is
	// dropped at the top)
	var loThr uint32
	var loBelow, hiBelow int
	hiThr := uint32(math.MaxUint32)
	if nBot > 0 {
		loThr, loBelow = ascendingAt(t, nBot)
	}
	if end < n {
		hiThr, hiBelow = ascendingAt(t, end-1)
	}
	var seenLo, seenHi int // entries equal to loThr / hiThr so far, in index order
	for i, v := range t {
		b := math.Float32bits(v) & 0x7fffffff
		switch {
		case b < loThr || b > hiThr:
			t[i] = 0
		case b == loThr:
			pos := loBelow + seenLo
			seenLo++
			if pos < nBot || pos >= end {
				t[i] = 0
			}
		case b == hiThr:
			pos := hiBelow + seenHi
			seenHi++
			if pos >= end {
				t[i] = 0
			}
		}
	}
}

// ascendingAt returns the magnitude bits of the entry at ascending
// position pos (0-based) of t sorted by magnitude, and how many entries
// have a smaller magnitude. It is the threshold selection of magnitude
// pruning (kernels.KthLargestAbsBits), counted from the top.
func ascendingAt(t []float32, pos int) (thr uint32, below int) {
	thr, above, equal := kernels.KthLargestAbsBits(t, len(t)-pos)
	return thr, len(t) - above - equal
}
