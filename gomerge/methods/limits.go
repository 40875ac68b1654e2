package methods

// factorBytes is the float32 size of the module's source factors.
func factorBytes(j *ModuleJob) int64 {
	factors := int64(0)
	for _, s := range j.Srcs {
		factors += int64(s.Mod.Rank*max(j.Experts, 1)) * int64(j.In+j.Out) * 4
	}
	return factors
}

// factorMemory is the peak memory of the merges that work on the factors
// (the factor-wise methods, cat): a few copies of them.
func factorMemory(j *ModuleJob, _ *Combine) int64 { return 4 * factorBytes(j) }

// exactMemory is the peak memory of the exact factorisations (svd, the
// span methods): the stacked factors and thin Qs, in float64.
func exactMemory(j *ModuleJob, _ *Combine) int64 {
	total := int64(0)
	for _, s := range j.Srcs {
		total += int64(s.Mod.Rank)
	}
	return 3*total*int64(j.In+j.Out)*8 + 3*factorBytes(j)
}

// denseMemory is the peak memory of the merges of the dense updates: one
// dense update per source (the result overwrites the first), the sketch,
// the factors.
func denseMemory(j *ModuleJob, _ *Combine) int64 {
	return int64(len(j.Srcs))*int64(j.In)*int64(j.Out)*4 + 3*factorBytes(j)
}

// taskArithmeticMemory is cat's memory, or the exact SVD's when svd_rank
// truncates it.
func taskArithmeticMemory(j *ModuleJob, c *Combine) int64 {
	if c.SVDRank != nil {
		return exactMemory(j, c)
	}
	return factorMemory(j, c)
}
