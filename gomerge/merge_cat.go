package gomerge

// mergeCat is PEFT's "cat" combination: A' stacks w_i s_i A_i along the
// rank, B' stacks B_i along its columns, so B'A' = sum_i w_i s_i B_i A_i
// exactly. Rows and columns beyond the sources' total rank are zero.
func mergeCat(srcs []source, rank, in, out int) (a, b []float32, err error) {
	a = make([]float32, rank*in)
	b = make([]float32, out*rank)
	off := 0
	for _, s := range srcs {
		fa, fb, err := s.mod.Factors()
		if err != nil {
			return nil, nil, err
		}
		r := s.mod.Rank
		ScaleInto(a[off*in:(off+r)*in], fa, float32(s.weight), float32(s.mod.Scaling))
		for i := 0; i < out; i++ {
			copy(b[i*rank+off:i*rank+off+r], fb[i*r:(i+1)*r])
		}
		off += r
	}
	return a, b, nil
}
