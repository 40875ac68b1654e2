package gguf

import "gomerge/gomerge/errs"

// permuteRows writes into dst the rows of src (a rows x cols row-major
// matrix) in the order of llama.cpp's LlamaModel.permute with n heads:
// w.reshape(n, 2, rows/n/2, cols).swapaxes(1, 2).reshape(rows, cols). The
// converter applies it to Wq (n = heads) and Wk (n = KV heads) so that
// RoPE rotates interleaved pairs; a LoRA update of those weights needs
// the same order on B's rows (A is unchanged).
func permuteRows(dst, src []float32, rows, cols, n int) error {
	if n <= 0 || rows%(2*n) != 0 {
		return errs.Value("cannot permute %d rows for %d heads (llama.cpp's Q/K layout needs a multiple of %d)", rows, n, 2*n)
	}
	half := rows / n / 2
	for h := range n {
		for i := range half {
			for j := range 2 {
				to := (h*half*2 + i*2 + j) * cols
				from := (h*2*half + j*half + i) * cols
				copy(dst[to:to+cols], src[from:from+cols])
			}
		}
	}
	return nil
}
