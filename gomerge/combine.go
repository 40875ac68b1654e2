package gomerge

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
