package gomerge

// Majority sign methods of TIES.
const (
	SignTotal     = "total"     // sign of the sum of the values
	SignFrequency = "frequency" // sign of the sum of the signs
)

func sign32(v float32) float32 {
	switch {
	case v > 0:
		return 1
	case v < 0:
		return -1
	}
	return 0
}

// ElectSigns returns, per element, the majority sign (+1 or -1) of the
// stacked tensors: by the sign of their sum ("total") or of the sum of their
// signs ("frequency"). A sum of exactly zero elects +1, as in PEFT's
// calculate_majority_sign_mask.
func ElectSigns(tensors [][]float32, method string) []float32 {
	out := make([]float32, len(tensors[0]))
	for j := range out {
		var s float32
		for _, t := range tensors {
			if method == SignFrequency {
				s += sign32(t[j])
			} else {
				s += t[j]
			}
		}
		if s >= 0 {
			out[j] = 1
		} else {
			out[j] = -1
		}
	}
	return out
}

// DisjointMerge is PEFT's disjoint_merge: per element, the sum of
// weights[i] * tensors[i] over the tensors whose sign equals the elected
// sign (zeros never agree), divided by the number of agreeing tensors
// (at least 1). The sign test uses the unweighted tensors.
func DisjointMerge(tensors [][]float32, weights []float32, signs []float32) []float32 {
	out := make([]float32, len(signs))
	for j, e := range signs {
		var sum, count float32
		for i, t := range tensors {
			if sign32(t[j]) == e {
				sum += t[j] * weights[i]
				count++
			}
		}
		out[j] = sum / max(count, 1)
	}
	return out
}
