package adapter

import (
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestTargetedParam(t *testing.T) {
	both := &Config{TargetParameters: []string{"mlp.experts.down_proj", "mlp.experts.gate_up_proj"}}
	one := &Config{TargetParameters: []string{"mlp.experts.gate_up_proj"}}
	odd := &Config{TargetParameters: []string{"experts.w_in", "experts.w_out"}}
	for _, tc := range []struct {
		name   string
		cfg    *Config
		module string
		want   string
		err    string
	}{
		{"outer wrapper is the last registered", both, "model.layers.0.mlp.experts", "model.layers.0.mlp.experts.down_proj", ""},
		{"inner wrapper is the first registered", both, "model.layers.0.mlp.experts.base_layer", "model.layers.0.mlp.experts.gate_up_proj", ""},
		{"a single target does not nest", one, "model.layers.3.mlp.experts", "model.layers.3.mlp.experts.gate_up_proj", ""},
		{"a module", both, "model.layers.0.self_attn.q_proj", "", ""},
		{"too deep", both, "model.layers.0.mlp.experts.base_layer.base_layer", "", "nested 2 deep"},
		{"unknown order", odd, "model.layers.0.experts", "", "does not know the order"},
		{"no target_parameters", &Config{}, "model.layers.0.mlp.experts", "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			got, err := tc.cfg.TargetedParam("f", tc.module)
			if tc.err != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.err)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, tc.want, got)
		})
	}
}

// TestExpertLayout checks ExpertFactors and StackExperts against PEFT's
// reshapes written out: A row e*r+k is expert e's row k, and B column k*E+e
// is expert e's column k.
func TestExpertLayout(t *testing.T) {
	const in, out, r, experts = 3, 2, 2, 3
	a := make([]float32, r*experts*in)
	b := make([]float32, out*r*experts)
	for i := range a {
		a[i] = float32(i + 1)
	}
	for i := range b {
		b[i] = float32(-(i + 1))
	}
	as, bs, ranks := make([][]float32, experts), make([][]float32, experts), make([]int, experts)
	for e := range experts {
		ae, be := ExpertFactors(a, b, in, out, r, experts, e, make([]float32, out*r))
		for k := range r {
			for i := range in {
				assert.Equal(t, a[(e*r+k)*in+i], ae[k*in+i])
			}
			for o := range out {
				assert.Equal(t, b[o*r*experts+k*experts+e], be[o*r+k])
			}
		}
		as[e], bs[e], ranks[e] = ae, be, r
	}
	gotA, gotB := make([]float32, len(a)), make([]float32, len(b))
	StackExperts(as, bs, ranks, in, out, r, gotA, gotB)
	assert.Equal(t, a, gotA)
	assert.Equal(t, b, gotB)

	// an expert of lower rank is padded with zeros
	ranks[1] = 1
	as[1], bs[1] = as[1][:in], []float32{7, 8}
	StackExperts(as, bs, ranks, in, out, r, gotA, gotB)
	assert.Equal(t, a[r*in:r*in+in], gotA[r*in:r*in+in])
	assert.Equal(t, make([]float32, in), gotA[r*in+in:2*r*in])
	assert.Equal(t, float32(7), gotB[0*r*experts+0*experts+1])
	assert.Equal(t, float32(0), gotB[0*r*experts+1*experts+1])
	assert.Equal(t, float32(8), gotB[1*r*experts+0*experts+1])
}

func TestUnionTargetParameters(t *testing.T) {
	both := &Config{TargetParameters: []string{"mlp.experts.gate_up_proj", "mlp.experts.down_proj"}}
	swapped := &Config{TargetParameters: []string{"mlp.experts.down_proj", "mlp.experts.gate_up_proj"}}
	one := &Config{TargetParameters: []string{"mlp.experts.down_proj"}}
	none := &Config{}
	got, err := UnionTargetParameters([]*Config{none, both, swapped}, []string{"a", "b", "c"})
	require.NoError(t, err)
	assert.Equal(t, []string{"mlp.experts.down_proj", "mlp.experts.gate_up_proj"}, got)
	got, err = UnionTargetParameters([]*Config{none, none}, []string{"a", "b"})
	require.NoError(t, err)
	assert.Nil(t, got)
	_, err = UnionTargetParameters([]*Config{both, none, one}, []string{"a", "b", "c"})
	require.Error(t, err)
	assert.Contains(t, err.Error(), "adapters a and c target different parameters")
}
