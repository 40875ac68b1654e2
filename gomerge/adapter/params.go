package adapter

import (
	"slices"
	"strings"

	"gomerge/gomerge/errs"
)

// Parameter targets (PEFT's target_parameters, lora.ParamWrapper).
//
// PEFT wraps a targeted nn.Parameter, such as the 3-D expert tensor
// mlp.experts.gate_up_proj [E, 2I, H] of a mixture of experts, in a
// ParamWrapper whose lora_A is (r*E x in) and lora_B is (out x r*E), r being
// the config's rank per expert. Expert e's factors are the rows e*r..e*r+r-1
// of A and the columns e, E+e, 2E+e, ... of B (PEFT reshapes A to (E, r, in)
// and B to (out, r, E)). Its update is B_e A_e times alpha/r (or
// alpha/sqrt(r)), the rank and alpha resolved through rank_pattern and
// alpha_pattern on the parameter's path (model.layers.0.mlp.experts.gate_up_proj).
//
// Several parameters of one module nest: the wrapper of the parameter
// registered first is innermost, so that its factors are saved as
// <module>.base_layer.lora_A.weight and the last one's as
// <module>.lora_A.weight. The saved names hold the module only, so the
// parameter of each nesting depth follows from the registration order of
// the targeted parameters in the model's class (ParamOrder).

// ParamOrder is the registration order of the expert parameters of the
// mixture-of-experts classes of transformers 5 (Mixtral, Qwen2/3-MoE,
// DeepSeek-V3 and the other qwen2_moe-mapped models, gpt-oss): the order
// in which PEFT nests their ParamWrappers, innermost first.
var ParamOrder = []string{"gate_up_proj", "gate_up_proj_bias", "down_proj", "down_proj_bias"}

// stripBaseLayer removes the ".base_layer" components of a module path and
// returns how many there were (the nesting depth).
func stripBaseLayer(name string) (string, int) {
	depth := 0
	for strings.HasSuffix(name, ".base_layer") {
		name = strings.TrimSuffix(name, ".base_layer")
		depth++
	}
	return name, depth
}

// paramCandidates returns the names of the parameters of module (without
// ".base_layer") that target_parameters targets, by PEFT's rule (the key
// module.param equals an entry or ends with "."+entry).
func (c *Config) paramCandidates(module string) []string {
	var out []string
	for _, t := range c.TargetParameters {
		p := t[strings.LastIndex(t, ".")+1:]
		key := module + "." + p
		if (key == t || strings.HasSuffix(key, "."+t)) && !slices.Contains(out, p) {
			out = append(out, p)
		}
	}
	return out
}

// TargetedParam returns the full path of the parameter that the module
// named name in an adapter's file adapts (the module path with its
// ".base_layer" components resolved), or "" when it adapts a module. An
// error names the module when its nesting cannot be told apart.
func (c *Config) TargetedParam(path, name string) (string, error) {
	if len(c.TargetParameters) == 0 {
		return "", nil
	}
	module, depth := stripBaseLayer(name)
	cands := c.paramCandidates(module)
	if len(cands) == 0 {
		return "", nil
	}
	if len(cands) > 1 {
		for _, p := range cands {
			if !slices.Contains(ParamOrder, p) {
				return "", errs.Value("%s: module %s: target_parameters %q nest several parameters of %s, and gomerge "+
					"does not know the order in which the model registers %s (it knows %s); target them in "+
					"separate adapters", path, name, c.TargetParameters, module, p, strings.Join(ParamOrder, ", "))
			}
		}
		slices.SortFunc(cands, func(x, y string) int { return slices.Index(ParamOrder, x) - slices.Index(ParamOrder, y) })
	}
	if depth >= len(cands) {
		return "", errs.Value("%s: module %s is nested %d deep through base_layer, but target_parameters %q target "+
			"only %d parameter(s) of %s", path, name, depth, c.TargetParameters, len(cands), module)
	}
	return module + "." + cands[len(cands)-1-depth], nil
}

// UnionTargetParameters is the target_parameters of a merge: the set the
// adapters that target parameters share (PEFT requires all adapters on one
// model to target the same parameters; adapters that target none merge with
// them), nil when none does.
func UnionTargetParameters(cfgs []*Config, names []string) ([]string, error) {
	var out []string
	first := -1
	for i, c := range cfgs {
		if len(c.TargetParameters) == 0 {
			continue
		}
		set := slices.Sorted(slices.Values(c.TargetParameters))
		set = slices.Compact(set)
		if first < 0 {
			out, first = set, i
			continue
		}
		if !slices.Equal(set, out) {
			return nil, errs.Value("adapters %s and %s target different parameters (target_parameters %q and %q); "+
				"adapters merged together must target the same ones, as PEFT requires of adapters on one model",
				names[first], names[i], out, set)
		}
	}
	return out, nil
}

// ExpertFactors returns expert e's factors of a parameter module with
// the given number of experts: A_e (r x in), a view of rows of a, and B_e
// (out x r), gathered from the columns of b into dst (len out*r).
func ExpertFactors(a, b []float32, in, out, r, experts, e int, dst []float32) (ae, be []float32) {
	ae = a[e*r*in : (e+1)*r*in]
	rows := r * experts
	for o := range out {
		src := b[o*rows : (o+1)*rows]
		d := dst[o*r : (o+1)*r]
		for k := range r {
			d[k] = src[k*experts+e]
		}
	}
	return ae, dst
}

// StackExperts writes the experts' factors (a[e]: ranks[e] x in, b[e]: out
// x ranks[e]) into PEFT's stacked layout at rank r per expert: A (r*E x in) and B
// (out x r*E), an expert of lower rank padded with zeros (which leaves its
// update unchanged).
func StackExperts(a, b [][]float32, ranks []int, in, out, r int, dstA, dstB []float32) {
	experts := len(a)
	clear(dstA)
	clear(dstB)
	rows := r * experts
	for e := range experts {
		re := ranks[e]
		copy(dstA[e*r*in:], a[e][:re*in])
		for o := range out {
			src := b[e][o*re : (o+1)*re]
			d := dstB[o*rows : (o+1)*rows]
			for k := range re {
				d[k*experts+e] = src[k]
			}
		}
	}
}
