package methods

import (
	"slices"
	"sort"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
)

// NewRank is PEFT's rank of the merged adapter: the method's rank rule over
// the adapters' ranks (names are the adapters as the user gave them, for
// the errors).
func (c *Combine) NewRank(names []string, adapters []*adapter.Adapter) (int, error) {
	ranks := make([]int, len(adapters))
	for i, a := range adapters {
		ranks[i] = a.Config.MaxRank()
	}
	return c.AdapterRank(ranks, names)
}

// PlanModules pairs every module with the adapters that have it, each with
// its weight for the module (weights are compiled, one per adapter), and
// checks that their shapes agree (and their ranks, for the factor-wise
// methods); the jobs are sorted by module name.
func (c *Combine) PlanModules(names []string, weights adapter.Weights, adapters []*adapter.Adapter) ([]ModuleJob, error) {
	byName := map[string]*ModuleJob{}
	var order []string
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
				j = &ModuleJob{Name: name, Kind: m.Kind, In: m.In(), Out: m.Out(),
					ATail: m.RawA.Shape[1:], BTail: m.RawB.Shape[2:], Param: m.Param, Experts: m.Experts}
				byName[name] = j
				order = append(order, name)
				first[name] = i
			} else {
				f := adapters[first[name]].Modules[name]
				if m.Kind != j.Kind || !slices.Equal(m.RawA.Shape[1:], j.ATail) || m.Out() != j.Out || len(m.RawB.Shape) != len(f.RawB.Shape) {
					return nil, errs.Value("module %s: shapes differ between adapters: %s has lora_A %v / lora_B %v, %s has lora_A %v / lora_B %v",
						name, names[first[name]], f.RawA.Shape, f.RawB.Shape, names[i], m.RawA.Shape, m.RawB.Shape)
				}
				if m.Param != j.Param || m.Experts != j.Experts {
					return nil, errs.Value("module %s: %s adapts parameter %q with %d experts, %s adapts %q with %d experts "+
						"(adapters merged together need the same target_parameters, as PEFT requires of adapters on one model)",
						name, names[first[name]], j.Param, j.Experts, names[i], m.Param, m.Experts)
				}
				if c.Method().Rank.Own && m.Rank != f.Rank {
					return nil, errs.Value("module %s: combination_type %s needs equal ranks, but %s has rank %d and %s has rank %d",
						name, c.CombinationType, names[first[name]], f.Rank, names[i], m.Rank)
				}
			}
			w, err := weights[i].Resolve(i, names[i], name, layers)
			if err != nil {
				return nil, err
			}
			j.Srcs = append(j.Srcs, Source{Weight: w, Mod: m, Index: i})
		}
	}
	sort.Strings(order)
	jobs := make([]ModuleJob, len(order))
	for i, n := range order {
		jobs[i] = *byName[n]
	}
	return jobs, nil
}
