package methods

import (
	"context"
	"fmt"
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/safetensors"
)

// TestExpertsMergeAsModules checks that a job of stacked experts merges each
// expert exactly as a job of that expert's factors alone (named
// "<module>[e]"), for methods of every family, and stacks the results in
// PEFT's layout.
func TestExpertsMergeAsModules(t *testing.T) {
	const in, out, r, experts = 6, 5, 2, 3
	rng := rand.New(rand.NewPCG(1, 2))
	randn := func(n int) []float32 {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		return x
	}
	stacked := func(a, b []float32, rows int) *adapter.Module {
		return &adapter.Module{Name: "m", Kind: adapter.KindLinear, Rank: r, Scaling: 0.5, Param: "m.gate_up_proj", Experts: experts,
			RawA: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{rows, in}, Data: safetensors.Float32AsBytes(a)},
			RawB: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{out, rows}, Data: safetensors.Float32AsBytes(b)}}
	}
	as := [][]float32{randn(r * experts * in), randn(r * experts * in)}
	bs := [][]float32{randn(out * r * experts), randn(out * r * experts)}
	density, seed := 0.5, uint64(3)
	for _, tc := range []struct {
		name string
		c    Combine
		rank int
	}{
		{"linear", Combine{CombinationType: "linear"}, r},
		{"ties", Combine{CombinationType: "ties", Density: &density}, r},
		{"dare_ties", Combine{CombinationType: "dare_ties", Density: &density, Seed: &seed}, r},
		{"cat", Combine{CombinationType: "cat"}, 2 * r},
		{"svd", Combine{CombinationType: "svd"}, r},
		{"ties_svd", Combine{CombinationType: "ties_svd", Density: &density}, r},
	} {
		t.Run(tc.name, func(t *testing.T) {
			c := tc.c
			require.NoError(t, c.Validate())
			j := ModuleJob{Name: "m", Kind: adapter.KindLinear, In: in, Out: out, ATail: []int{in}, Param: "m.gate_up_proj", Experts: experts}
			for i := range as {
				j.Srcs = append(j.Srcs, Source{Weight: float64(i + 1), Mod: stacked(as[i], bs[i], r*experts), Index: i})
			}
			o, err := expertsModule(context.Background(), &j, &c, tc.rank)
			require.NoError(t, err)
			for e := range experts {
				sub := ModuleJob{Name: fmt.Sprintf("m[%d]", e), Kind: adapter.KindLinear, In: in, Out: out, ATail: []int{in}}
				for i := range as {
					ae, be := adapter.ExpertFactors(as[i], bs[i], in, out, r, experts, e, make([]float32, out*r))
					m := &adapter.Module{Name: sub.Name, Kind: adapter.KindLinear, Rank: r, Scaling: 0.5,
						RawA: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{r, in}, Data: safetensors.Float32AsBytes(ae)},
						RawB: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{out, r}, Data: safetensors.Float32AsBytes(be)}}
					sub.Srcs = append(sub.Srcs, Source{Weight: float64(i + 1), Mod: m, Index: i})
				}
				want, err := c.method.Merge(context.Background(), &sub, &c, tc.rank)
				require.NoError(t, err)
				gotA, gotB := adapter.ExpertFactors(o.a, o.b, in, out, o.rank, experts, e, make([]float32, out*o.rank))
				require.Equal(t, want.rank, o.rank)
				assert.Equal(t, want.a[:o.rank*in], gotA, "A of expert %d", e)
				assert.Equal(t, want.b[:out*o.rank], gotB, "B of expert %d", e)
			}
		})
	}
}
