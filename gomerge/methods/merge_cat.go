package methods

import "context"

// catModule is the merge of "cat": exact, at the adapter's rank (the sum of
// the ranks).
func catModule(_ context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
	a, b, err := mergeCat(c.weighted(j.Srcs), rank, j.In, j.Out)
	return moduleOutput{a: a, b: b, rank: rank}, err
}

// taskArithmeticModule is the merge of "task_arithmetic": lambda times the
// exact weighted sum of the updates, stacked as cat does, or, truncated by
// svd_rank, factorised by the exact SVD.
func taskArithmeticModule(ctx context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
	if c.SVDRank != nil {
		return svdModule(ctx, j, c, rank)
	}
	return catModule(ctx, j, c, rank)
}

// mergeCat is PEFT's "cat" combination: A' stacks w_i s_i A_i along the
// rank, B' stacks B_i along its columns, so B'A' = sum_i w_i s_i B_i A_i
// exactly. Rows and columns beyond the sources' total rank are zero.
func mergeCat(srcs []Source, rank, in, out int) (a, b []float32, err error) {
	a = make([]float32, rank*in)
	b = make([]float32, out*rank)
	off := 0
	for _, s := range srcs {
		fa, fb, err := s.Mod.Factors()
		if err != nil {
			return nil, nil, err
		}
		r := s.Mod.Rank
		ScaleInto(a[off*in:(off+r)*in], fa, float32(s.Weight), float32(s.Mod.Scaling))
		for i := 0; i < out; i++ {
			copy(b[i*rank+off:i*rank+off+r], fb[i*r:(i+1)*r])
		}
		off += r
	}
	return a, b, nil
}
