package gomerge

import (
	"regexp"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/safetensors"
)

// rankPattern lists, for modules whose rank differs from the adapter's, a
// pattern matching exactly that module.
func rankPattern(jobs []methods.ModuleJob, ranks []int, rank int) adapter.Patterns {
	var pattern adapter.Patterns
	for i, j := range jobs {
		if ranks[i] != rank {
			pattern = append(pattern, adapter.PatternEntry{Key: regexp.QuoteMeta(j.PatternKey()), Value: float64(ranks[i])})
		}
	}
	return pattern
}

// outputTensors lists the merged adapter's tensors: every module's A and B
// at the merged rank (the module's own rank for factor-wise merges).
func outputTensors(c *methods.Combine, jobs []methods.ModuleJob, rank int, dt safetensors.DType) []safetensors.OutTensor {
	outs := make([]safetensors.OutTensor, 0, 2*len(jobs))
	for i := range jobs {
		j := &jobs[i]
		r := rank
		if c.Method().Rank.Own {
			r = j.Srcs[0].Mod.Rank
		}
		aName, bName := adapter.ModuleKeys(j.Name, j.Kind)
		r = j.StackedRank(r)
		outs = append(outs, safetensors.OutTensor{Name: aName, DType: dt, Shape: append([]int{r}, j.ATail...)},
			safetensors.OutTensor{Name: bName, DType: dt, Shape: append([]int{j.Out, r}, j.BTail...)})
	}
	return outs
}
