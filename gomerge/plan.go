package gomerge

import (
	"regexp"
	"slices"
	"sort"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/safetensors"
)

// source is one adapter's module with its user weight and the adapter's
// position in the merge (which labels its random streams).
type source struct {
	weight float64
	mod    *adapter.Module
	index  int
	// Optional DARE keep-masks (one byte per element, non-zero keeps), given
	// by the caller instead of gomerge's generator: for A, B and dW.
	maskA, maskB, maskDW []byte
	// roundDW rounds the dense update to this dtype, as PEFT's
	// get_delta_weight does for half-precision factors ("" or F32: no rounding).
	roundDW safetensors.DType
}

// moduleJob is the work for one output module.
type moduleJob struct {
	name string
	kind adapter.ModuleKind
	srcs []source
	in   int
	out  int
	// shapes of A and B without the rank, for the output tensors
	aTail []int
	bTail []int
}

// newRank is PEFT's rank of the merged adapter: the method's rank rule.
func newRank(opts Options, adapters []*adapter.Adapter) (int, error) {
	ranks := make([]int, len(adapters))
	for i, a := range adapters {
		ranks[i] = a.Config.MaxRank()
	}
	return opts.method.Rank.adapter(ranks, opts.Adapters, opts.method, &opts.Combine)
}

// planModules pairs every module with the adapters that have it, each with
// its weight for the module, and checks that their shapes agree.
func planModules(opts Options, adapters []*adapter.Adapter) ([]moduleJob, error) {
	byName := map[string]*moduleJob{}
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
				j = &moduleJob{name: name, kind: m.Kind, in: m.In(), out: m.Out(),
					aTail: m.RawA.Shape[1:], bTail: m.RawB.Shape[2:]}
				byName[name] = j
				names = append(names, name)
				first[name] = i
			} else {
				f := adapters[first[name]].Modules[name]
				if m.Kind != j.kind || !slices.Equal(m.RawA.Shape[1:], j.aTail) || m.Out() != j.out || len(m.RawB.Shape) != len(f.RawB.Shape) {
					return nil, errs.Value("module %s: shapes differ between adapters: %s has lora_A %v / lora_B %v, %s has lora_A %v / lora_B %v",
						name, opts.Adapters[first[name]], f.RawA.Shape, f.RawB.Shape, opts.Adapters[i], m.RawA.Shape, m.RawB.Shape)
				}
				if opts.method.Rank.own && m.Rank != f.Rank {
					return nil, errs.Value("module %s: combination_type %s needs equal ranks, but %s has rank %d and %s has rank %d",
						name, opts.CombinationType, opts.Adapters[first[name]], f.Rank, opts.Adapters[i], m.Rank)
				}
			}
			w, err := opts.Weights[i].Resolve(i, opts.Adapters[i], name, layers)
			if err != nil {
				return nil, err
			}
			j.srcs = append(j.srcs, source{weight: w, mod: m, index: i})
		}
	}
	sort.Strings(names)
	jobs := make([]moduleJob, len(names))
	for i, n := range names {
		jobs[i] = *byName[n]
	}
	return jobs, nil
}

// rankPattern lists, for modules whose rank differs from the adapter's, a
// pattern matching exactly that module.
func rankPattern(jobs []moduleJob, ranks []int, rank int) adapter.Patterns {
	var pattern adapter.Patterns
	for i, j := range jobs {
		if ranks[i] != rank {
			pattern = append(pattern, adapter.PatternEntry{Key: regexp.QuoteMeta(j.name), Value: float64(ranks[i])})
		}
	}
	return pattern
}

// outputTensors lists the merged adapter's tensors: every module's A and B
// at the merged rank (the module's own rank for factor-wise merges).
func outputTensors(c *Combine, jobs []moduleJob, rank int, dt safetensors.DType) []safetensors.OutTensor {
	outs := make([]safetensors.OutTensor, 0, 2*len(jobs))
	for i := range jobs {
		j := &jobs[i]
		r := rank
		if c.method.Rank.own {
			r = j.srcs[0].mod.Rank
		}
		aName, bName := adapter.ModuleKeys(j.name, j.kind)
		outs = append(outs, safetensors.OutTensor{Name: aName, DType: dt, Shape: append([]int{r}, j.aTail...)},
			safetensors.OutTensor{Name: bName, DType: dt, Shape: append([]int{j.out, r}, j.bTail...)})
	}
	return outs
}
