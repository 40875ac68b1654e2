package linalg

import (
	"encoding/json"
	"fmt"
	"gomerge/gomerge/errs"
	"math"
	"strconv"
	"strings"
)

// RankSpec is svd_rank: a fixed rank, or the energy rule "energy:F", which
// gives each module the smallest rank that keeps the fraction F of the
// squared Frobenius norm of its update (capped by max_rank).
type RankSpec struct {
	Fixed  int     // > 0 for a fixed rank
	Energy float64 // in (0, 1] for the energy rule
}

// UnmarshalJSON reads an integer, or a string "energy:F" (or an integer
// written as a string, as a command line gives it).
func (r *RankSpec) UnmarshalJSON(b []byte) error {
	var n int
	if err := json.Unmarshal(b, &n); err == nil {
		*r = RankSpec{Fixed: n}
		return nil
	}
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return fmt.Errorf("svd_rank: expected an integer or a string such as \"energy:0.99\", got %s", b)
	}
	spec, err := ParseRankSpec(s)
	if err != nil {
		return err
	}
	*r = spec
	return nil
}

// MarshalJSON writes the form UnmarshalJSON reads.
func (r RankSpec) MarshalJSON() ([]byte, error) {
	if r.Energy > 0 {
		return json.Marshal(r.String())
	}
	return json.Marshal(r.Fixed)
}

// String is the rank as the user writes it: "16" or "energy:0.99".
func (r RankSpec) String() string {
	if r.Energy > 0 {
		return "energy:" + strconv.FormatFloat(r.Energy, 'g', -1, 64)
	}
	return strconv.Itoa(r.Fixed)
}

// ParseRankSpec reads "16" or "energy:0.99"; the checks of the values are
// validate's.
func ParseRankSpec(s string) (RankSpec, error) {
	s = strings.TrimSpace(s)
	if f, ok := strings.CutPrefix(s, "energy:"); ok {
		e, err := strconv.ParseFloat(strings.TrimSpace(f), 64)
		if err != nil || math.IsNaN(e) {
			return RankSpec{}, errs.Value("svd_rank: %q: the energy rule needs a fraction, as in \"energy:0.99\"", s)
		}
		if e <= 0 || e > 1 {
			return RankSpec{}, errs.Value("svd_rank: %q: the energy fraction must be in (0, 1]", s)
		}
		return RankSpec{Energy: e}, nil
	}
	n, err := strconv.Atoi(s)
	if err != nil {
		return RankSpec{}, errs.Value("svd_rank: %q is neither an integer nor an energy rule such as \"energy:0.99\"", s)
	}
	return RankSpec{Fixed: n}, nil
}

// RankRule picks a module's output rank from the singular values of its
// update, and reports the relative error of that truncation.
type RankRule struct {
	Fixed  int     // the rank, or 0 for the energy rule
	Energy float64 // kept fraction of the squared Frobenius norm
	Max    int     // cap of the energy rule (0: none)
}

// Choose returns the rank for singular values s (in decreasing order): the
// fixed rank, or the smallest k (at least 1) with sum_{i<k} s_i^2 >=
// Energy * sum s_i^2, capped by Max.
func (r RankRule) Choose(s []float64) int {
	if r.Fixed > 0 {
		return r.Fixed
	}
	total := 0.0
	for _, v := range s {
		total += v * v
	}
	k, kept := len(s), 0.0
	for i, v := range s {
		kept += v * v
		if kept >= r.Energy*total*(1-1e-12) {
			k = i + 1
			break
		}
	}
	k = max(k, 1)
	if r.Max > 0 {
		k = min(k, r.Max)
	}
	return k
}

// TruncationError is the relative Frobenius error of keeping the first k
// singular values: sqrt(sum_{i>=k} s_i^2 / sum s_i^2) (0 for a zero update).
func TruncationError(s []float64, k int) float64 {
	total, rest := 0.0, 0.0
	for i, v := range s {
		total += v * v
		if i >= k {
			rest += v * v
		}
	}
	if total == 0 {
		return 0
	}
	return math.Sqrt(rest / total)
}
