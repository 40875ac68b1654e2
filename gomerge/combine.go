package gomerge

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

// combineGrain is the chunk of elements combined at once: the chunks of all
// tensors stay in cache between the election and the disjoint merge.
const combineGrain = 1 << 14

// Apply combines the tensors with the weights and returns the result.
// With owned, the tensors are the caller's scratch: they are pruned in place
// and the result is written over tensors[0]. Otherwise they are read-only
// (views of files or of a model's memory) and are copied before pruning.
// dare(i, t) applies DARE's random mask of tensor i to t, in place.
func (c Combination) Apply(tensors [][]float32, weights []float32, dare func(i int, t []float32), owned bool) []float32 {
	prune := c.Density < 1 // PEFT's prune() returns the tensor untouched for density >= 1
	if prune && c.Method != "task_arithmetic" {
		src := tensors
		if !owned { // prune into scratch copies, never into the caller's memory
			tensors = make([][]float32, len(src))
			for i, t := range src {
				tensors[i] = getBuf(len(t))
			}
			defer func() {
				for _, t := range tensors[1:] {
					putBuf(t)
				}
			}()
			owned = true
		}
		each := func(i int) {
			switch c.Method {
			case "magnitude_prune", "ties":
				MagnitudePruneInto(tensors[i], src[i], c.Density)
			case "dare_linear", "dare_ties":
				if &tensors[i][0] != &src[i][0] {
					copy(tensors[i], src[i])
				}
				dare(i, tensors[i])
			}
		}
		// one goroutine per tensor when tensors are large
		parallelFor(len(tensors), max(1, combineGrain*4/max(1, len(tensors[0]))), func(lo, hi int) {
			for i := lo; i < hi; i++ {
				each(i)
			}
		})
	}
	out := tensors[0]
	if !owned {
		out = make([]float32, len(tensors[0]))
	}
	ties := c.Method == "ties" || c.Method == "dare_ties"
	parallelFor(len(out), combineGrain, func(lo, hi int) {
		// scratch for one grain, reused across this range's grains (they stay in cache)
		sub := make([][]float32, len(tensors))
		res := make([]float32, combineGrain)
		count := make([]float32, combineGrain)
		signs := make([]float32, combineGrain)
		for clo := lo; clo < hi; clo += combineGrain {
			chi := min(clo+combineGrain, hi)
			for i, t := range tensors {
				sub[i] = t[clo:chi]
			}
			r := res[:chi-clo]
			if ties {
				electSignsInto(signs[:chi-clo], sub, c.SignMethod)
				disjointMergeInto(r, count[:chi-clo], sub, weights, signs[:chi-clo])
			} else {
				taskArithmeticInto(r, sub, weights)
			}
			copy(out[clo:chi], r)
		}
	})
	return out
}

// TaskArithmetic returns sum_i weights[i] * tensors[i], computed in float32
// the way torch does for a stacked float32 tensor: each product rounded to
// float32, then summed in order.
func TaskArithmetic(tensors [][]float32, weights []float32) []float32 {
	out := make([]float32, len(tensors[0]))
	taskArithmeticInto(out, tensors, weights)
	return out
}

func taskArithmeticInto(out []float32, tensors [][]float32, weights []float32) {
	clear(out)
	for i, t := range tensors {
		w := weights[i]
		t = t[:len(out)]
		for j, v := range t {
			out[j] += v * w
		}
	}
}

// ScaleInto writes x * w1 * w2 into dst, rounding after each product as
// torch does for `tensor * w1 * w2` with Python scalars.
func ScaleInto(dst, x []float32, w1, w2 float32) {
	for i, v := range x {
		dst[i] = (v * w1) * w2
	}
}
