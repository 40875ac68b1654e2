package gomerge

import (
	"regexp"
	"slices"
	"sort"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/methods"
	"gomerge/gomerge/safetensors"
)

// newRank is PEFT's rank of the merged adapter: the method's rank rule.
func newRank(opts Options, adapters []*adapter.Adapter) (int, error) {
	ranks := make([]int, len(adapters))
	for i, a := range adapters {
		ranks[i] = a.Config.MaxRank()
	}
	return opts.AdapterRank(ranks, opts.Adapters)
}

// planModules pairs every module with the adapters that have it, each with
// its weight for the module, and checks that their shapes agree.
func planModules(opts Options, adapters []*adapter.Adapter) ([]methods.ModuleJob, error) {
	byName := map[string]*methods.ModuleJob{}
	var names []string
	first := map[string]int{}
	var all []string
	for _, a := range adapters {
		all = append(all, a.Order...)
	}
	layers := adapter.LayerCount(all) // what gradient weights spread over
	for i, a := range adapters {
		for _, name := range a.Order {
			m := a.Modules[name]
			j := byName[name]
			if j == nil {
				j = &methods.ModuleJob{Name: name, Kind: m.Kind, In: m.In(), Out: m.Out(),
					ATail: m.RawA.Shape[1:], BTail: m.RawB.Shape[2:]}
				byName[name] = j
				names = append(names, name)
				first[name] = i
			} else {
				f := adapters[first[name]].Modules[name]
				if m.Kind != j.Kind || !slices.Equal(m.RawA.Shape[1:], j.ATail) || m.Out() != j.Out || len(m.RawB.Shape) != len(f.RawB.Shape) {
					return nil, errs.Value("module %s: shapes differ between adapters: %s has lora_A %v / lora_B %v, %s has lora_A %v / lora_B %v",
						name, opts.Adapters[first[name]], f.RawA.Shape, f.RawB.Shape, opts.Adapters[i], m.RawA.Shape, m.RawB.Shape)
				}
				if opts.Method().Rank.Own && m.Rank != f.Rank {
					return nil, errs.Value("module %s: combination_type %s needs equal ranks, but %s has rank %d and %s has rank %d",
						name, opts.CombinationType, opts.Adapters[first[name]], f.Rank, opts.Adapters[i], m.Rank)
				}
			}
			w, err := opts.Weights[i].Resolve(i, opts.Adapters[i], name, layers)
			if err != nil {
				return nil, err
			}
			j.Srcs = append(j.Srcs, methods.Source{Weight: w, Mod: m, Index: i})
		}
	}
	sort.Strings(names)
	jobs := make([]methods.ModuleJob, len(names))
	for i, n := range names {
		jobs[i] = *byName[n]
	}
	return jobs, nil
}

// rankPattern lists, for modules whose rank differs from the adapter's, a
// pattern matching exactly that module.
func rankPattern(jobs []methods.ModuleJob, ranks []int, rank int) adapter.Patterns {
	var pattern adapter.Patterns
	for i, j := range jobs {
		if ranks[i] != rank {
			pattern = append(pattern, adapter.PatternEntry{Key: regexp.QuoteMeta(j.Name), Value: float64(ranks[i])})
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
		outs = append(outs, safetensors.OutTensor{Name: aName, DType: dt, Shape: append([]int{r}, j.ATail...)},
			safetensors.OutTensor{Name: bName, DType: dt, Shape: append([]int{j.Out, r}, j.BTail...)})
	}
	return outs
}
