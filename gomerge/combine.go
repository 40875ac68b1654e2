package gomerge

import "math/rand/v2"

// Combination is one of PEFT's element-wise ways to combine task tensors
// (merge_utils): the same function serves the factors (family 1) and the
// dense updates (family 2).
type Combination struct {
	Method     string  // "task_arithmetic", "magnitude_prune", "ties", "dare_linear", "dare_ties"
	Density    float64 // fraction kept by the pruning methods
	SignMethod string  // "total" or "frequency", for ties and dare_ties
}

// combinationFor maps a PEFT combination_type to its element-wise method.
func combinationFor(combinationType string) string {
	switch combinationType {
	case "linear", "svd", "cat":
		return "task_arithmetic"
	case "ties", "ties_svd":
		return "ties"
	case "dare_linear", "dare_linear_svd":
		return "dare_linear"
	case "dare_ties", "dare_ties_svd":
		return "dare_ties"
	case "magnitude_prune", "magnitude_prune_svd":
		return "magnitude_prune"
	}
	return ""
}

// Apply combines the tensors with the weights. The tensors are pruned in
// place; rng(i) gives the random stream of tensor i (used by DARE only).
func (c Combination) Apply(tensors [][]float32, weights []float32, rng func(i int) *rand.Rand) []float32 {
	prune := c.Density < 1 // PEFT's prune() returns the tensor untouched for density >= 1
	switch c.Method {
	case "magnitude_prune", "ties":
		if prune {
			for _, t := range tensors {
				MagnitudePrune(t, c.Density)
			}
		}
	case "dare_linear", "dare_ties":
		if prune {
			for i, t := range tensors {
				RandomPrune(t, c.Density, true, rng(i))
			}
		}
	}
	switch c.Method {
	case "ties", "dare_ties":
		return DisjointMerge(tensors, weights, ElectSigns(tensors, c.SignMethod))
	}
	return TaskArithmetic(tensors, weights)
}

// TaskArithmetic returns sum_i weights[i] * tensors[i], computed in float32
// the way torch does for a stacked float32 tensor: each product rounded to
// float32, then summed in order.
func TaskArithmetic(tensors [][]float32, weights []float32) []float32 {
	out := make([]float32, len(tensors[0]))
	for i, t := range tensors {
		w := weights[i]
		for j, v := range t {
			out[j] += v * w
		}
	}
	return out
}

// ScaleInto writes x * w1 * w2 into dst, rounding after each product as
// torch does for `tensor * w1 * w2` with Python scalars.
func ScaleInto(dst, x []float32, w1, w2 float32) {
	for i, v := range x {
		dst[i] = (v * w1) * w2
	}
}
