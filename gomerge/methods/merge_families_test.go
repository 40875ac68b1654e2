package methods

import (
	"math/rand/v2"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/safetensors"
)

func TestFactorWeights(t *testing.T) {
	tests := []struct {
		w, s   float64
		wa, wb float32
	}{
		{2, 2, 2, 2},
		{-2, 2, -2, 2},
		{0, 3, 0, 0},
		{0.5, 0.5, 0.5, 0.5},
		{-1, 0.25, -0.5, 0.5},
	}
	for _, tc := range tests {
		wa, wb := factorWeights(tc.w, tc.s)
		assert.Equal(t, tc.wa, wa, "w=%v s=%v", tc.w, tc.s)
		assert.Equal(t, tc.wb, wb, "w=%v s=%v", tc.w, tc.s)
	}
}

func mod(rank int, scaling float64, a, b []float32) *adapter.Module {
	return &adapter.Module{Rank: rank, Scaling: scaling, RawA: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{rank, len(a) / rank}, Data: safetensors.Encode(safetensors.F32, a)},
		RawB: safetensors.RawTensor{DType: safetensors.F32, Shape: []int{len(b) / rank, rank}, Data: safetensors.Encode(safetensors.F32, b)}}
}

func TestMergeLinearByHand(t *testing.T) {
	// rank 1, In 2, Out 2; weights w*s: 4 and -1
	s1 := Source{Weight: 2, Mod: mod(1, 2, []float32{1, 2}, []float32{3, 4})}
	s2 := Source{Weight: -1, Mod: mod(1, 1, []float32{5, 6}, []float32{7, 8})}
	a, b, r, err := mergeFactors([]Source{s1, s2}, comb("linear", 1), 0, "m")
	require.NoError(t, err)
	assert.Equal(t, 1, r)
	assert.Equal(t, []float32{2*1 - 1*5, 2*2 - 1*6}, a) // sign(c) sqrt|c|: 2 and -1
	assert.Equal(t, []float32{2*3 + 1*7, 2*4 + 1*8}, b) // sqrt|c|: 2 and 1
}

func TestMergeCatByHand(t *testing.T) {
	s1 := Source{Weight: 2, Mod: mod(1, 0.5, []float32{1, 2}, []float32{3, 4})}
	s2 := Source{Weight: 3, Mod: mod(1, 1, []float32{5, 6}, []float32{7, 8})}
	a, b, err := mergeCat([]Source{s1, s2}, 3, 2, 2) // rank 3: one zero row/column of padding
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 15, 18, 0, 0}, a)
	assert.Equal(t, []float32{3, 7, 0, 4, 8, 0}, b)
}

func TestMergeSVDIsExactAtFullRank(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	out, in := 9, 7
	var srcs []Source
	want := make([]float64, out*in)
	for i, w := range []float64{2, -0.5, 1} {
		a, b := testutil.RandTensor(rng, 2, in), testutil.RandTensor(rng, out, 2)
		s := float64(i + 1)
		srcs = append(srcs, Source{Weight: w, Mod: mod(2, s, a.Data, b.Data)})
		for j, v := range testutil.Product(a.Data, b.Data, out, 2, in) {
			want[j] += w * s * v
		}
	}
	a, b, k, relErr, err := mergeSVD(srcs, linalg.RankRule{Fixed: 6}, in, out, nil)
	require.NoError(t, err)
	assert.Equal(t, 6, k)
	assert.InDelta(t, 0, relErr, 1e-12, "rank 6 holds the whole sum of three rank-2 updates")
	got := testutil.Product(a, b, out, 6, in)
	for i := range want {
		assert.InDelta(t, want[i], got[i], 1e-5)
	}
}

func TestClampQuantile(t *testing.T) {
	// torch.quantile([-4, -1, 0, 2, 3, 10], 0.5) = 1.0 (linear interpolation); clamp to [-1, 1]
	a := []float32{-4, 2, 10}
	b := []float32{-1, 0, 3}
	ClampQuantile(a, b, 0.5)
	assert.Equal(t, []float32{-1, 1, 1}, a)
	assert.Equal(t, []float32{-1, 0, 1}, b)
	// quantile 0.9 of 6 values: pos 4.5 between 3 and 10 -> 6.5
	a = []float32{-4, 2, 10}
	b = []float32{-1, 0, 3}
	ClampQuantile(a, b, 0.9)
	assert.Equal(t, []float32{-4, 2, 6.5}, a)
}
