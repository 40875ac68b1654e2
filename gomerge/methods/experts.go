package methods

import (
	"context"
	"fmt"
	"math"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/safetensors"
)

// expertsModule merges a module of stacked experts (PEFT's target_parameters
// on a 3-D expert tensor, adapter/params.go): each expert's update B_e A_e
// is a low-rank matrix of its own, merged by the method as a module is (an
// expert of its own name, "<module>[e]", which labels its random streams),
// and the results are stacked back at the largest expert rank, lower ranks
// padded with zeros. The outcome's rank is the rank per expert (PEFT's r of
// the parameter) and its error the largest of the experts'.
func expertsModule(ctx context.Context, j *ModuleJob, c *Combine, rank int) (moduleOutput, error) {
	experts := j.Experts
	full := make([][2][]float32, len(j.Srcs))
	for i, s := range j.Srcs {
		a, b, err := s.Mod.Factors()
		if err != nil {
			return moduleOutput{}, err
		}
		full[i] = [2][]float32{a, b}
	}
	as, bs := make([][]float32, experts), make([][]float32, experts)
	ranks := make([]int, experts)
	defer func() {
		for e := range experts {
			if as[e] != nil {
				pool.Put(as[e])
				pool.Put(bs[e])
			}
		}
	}()
	out := moduleOutput{relErr: math.NaN()}
	for e := range experts {
		sub := ModuleJob{Name: fmt.Sprintf("%s[%d]", j.Name, e), Kind: adapter.KindLinear, In: j.In, Out: j.Out,
			ATail: j.ATail, BTail: j.BTail, Srcs: make([]Source, len(j.Srcs))}
		for i, s := range j.Srcs {
			r := s.Mod.Rank
			bufB := make([]float32, j.Out*r)
			ae, be := adapter.ExpertFactors(full[i][0], full[i][1], j.In, j.Out, r, experts, e, bufB)
			m := &adapter.Module{Name: sub.Name, Kind: adapter.KindLinear, Rank: r, Alpha: s.Mod.Alpha, Scaling: s.Mod.Scaling,
				RawA: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{r, j.In}, Data: safetensors.Float32AsBytes(ae)},
				RawB: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{j.Out, r}, Data: safetensors.Float32AsBytes(be)}}
			sub.Srcs[i] = Source{Weight: s.Weight, Mod: m, Index: s.Index, RoundDW: s.RoundDW}
		}
		o, err := c.method.Merge(ctx, &sub, c, rank)
		if err != nil {
			return moduleOutput{}, err
		}
		as[e], bs[e], ranks[e] = o.a, o.b, o.rank
		out.rank = max(out.rank, o.rank)
		if !math.IsNaN(o.relErr) && (math.IsNaN(out.relErr) || o.relErr > out.relErr) {
			out.relErr = o.relErr
		}
	}
	out.a = pool.Get(out.rank * experts * j.In)
	out.b = pool.Get(j.Out * out.rank * experts)
	adapter.StackExperts(as, bs, ranks, j.In, j.Out, out.rank, out.a, out.b)
	return out, nil
}
