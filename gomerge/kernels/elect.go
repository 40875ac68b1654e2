package kernels

import "math"

// Majority sign methods of TIES.
const (
	SignTotal     = "total"     // sign of the sum of the values
	SignFrequency = "frequency" // sign of the sum of the signs
)

// isPositive is 1 when v > 0 and 0 otherwise (zeros, negatives, NaN); the
// compiler turns it into a conditional move, not a branch.
func isPositive(v float32) uint32 {
	if v > 0 {
		return 1
	}
	return 0
}

// ElectSigns returns, per element, the majority sign (+1 or -1) of the
// stacked tensors: by the sign of their sum ("total") or of the sum of their
// signs ("frequency"). A sum of exactly zero elects +1, as in PEFT's
// calculate_majority_sign_mask.
func ElectSigns(tensors [][]float32, method string) []float32 {
	sum := make([]float32, len(tensors[0]))
	electSignsInto(sum, tensors, method)
	return sum
}

func electSignsInto(sum []float32, tensors [][]float32, method string) {
	clear(sum)
	for _, t := range tensors {
		t = t[:len(sum)]
		if method == SignFrequency {
			for j, v := range t {
				sum[j] += float32(isPositive(v)) - float32(isPositive(-v))
			}
		} else {
			for j, v := range t {
				sum[j] += v
			}
		}
	}
	for j, v := range sum {
		// +1 for v >= 0 (including -0), -1 otherwise
		neg := isPositive(-v)
		sum[j] = 1 - 2*float32(neg)
	}
}

// DisjointMerge is PEFT's disjoint_merge: per element, the sum of
// weights[i] * tensors[i] over the tensors whose sign equals the elected
// sign (zeros never agree), divided by the number of agreeing tensors
// (at least 1). The sign test uses the unweighted tensors.
func DisjointMerge(tensors [][]float32, weights []float32, signs []float32) []float32 {
	sum := make([]float32, len(signs))
	disjointMergeInto(sum, make([]float32, len(signs)), tensors, weights, signs)
	return sum
}

func disjointMergeInto(sum, count []float32, tensors [][]float32, weights []float32, signs []float32) {
	clear(sum)
	clear(count)
	for i, t := range tensors {
		t = t[:len(signs)]
		w := weights[i]
		for j, v := range t {
			agree := Agrees(v, signs[j])
			sum[j] += v * w * agree
			count[j] += agree
		}
	}
	for j := range sum {
		sum[j] /= max(count[j], 1)
	}
}

// Agrees is 1 when v is non-zero and has the sign of the elected sign
// (+1 or -1), else 0: integer ops, no branch.
func Agrees(v, sign float32) float32 {
	vb := math.Float32bits(v)
	mag := vb & 0x7fffffff
	nonzero := (mag | -mag) >> 31
	same := (vb^math.Float32bits(sign))>>31 ^ 1
	return float32(nonzero & same)
}
