package methods

import (
	"context"
	"math"
	"math/rand/v2"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/linalg"
)

// gtaReference is mergekit's merge_group on already pruned task tensors,
// written out: weighted deltas, the sum consensus of get_mask, the divisor,
// normalize and lambda.
func gtaReference(pruned [][]float32, weights []float32, consensus, normalize bool, lambda float32) []float32 {
	out := make([]float32, len(pruned[0]))
	var wsum float32
	for _, w := range weights {
		wsum += w
	}
	for e := range out {
		var sum, mixed, div float32
		for i, t := range pruned {
			sum += t[e] * weights[i]
		}
		for i, t := range pruned {
			d := t[e] * weights[i]
			sign := float32(0)
			if d > 0 {
				sign = 1
			} else if d < 0 {
				sign = -1
			}
			majority := float32(-1)
			if sum >= 0 {
				majority = 1
			}
			if !consensus || sign == majority {
				mixed += d
				div += weights[i]
			}
		}
		if !consensus {
			div = wsum
			if float32(math.Abs(float64(div))) < 1e-8 {
				div = 1
			}
		} else if div == 0 {
			div = 1
		}
		if normalize {
			mixed /= div
		}
		out[e] = mixed * lambda
	}
	return out
}

func TestGeneralizedCombineIsMergekitsMergeGroup(t *testing.T) {
	rng := rand.New(rand.NewPCG(1, 2))
	rows, cols := 12, 20
	for _, name := range []string{"breadcrumbs", "breadcrumbs_ties", "della", "della_linear"} {
		for _, weights := range [][]float32{{1, 0.5, -0.7}, {0.3, 0.3}, {2}} {
			m, err := LookupMethod(name)
			require.NoError(t, err)
			density, lambda := 0.4, 0.8
			c := Combine{CombinationType: name, Density: &density, Lambda: &lambda}
			require.NoError(t, c.Validate())
			g := c.generalized(mergekitOf(name))
			g.seed = 3
			dws := make([][]float32, len(weights))
			pruned := make([][]float32, len(weights))
			indices := make([]int, len(weights))
			for i := range dws {
				dws[i] = make([]float32, rows*cols)
				for e := range dws[i] {
					dws[i][e] = float32(rng.NormFloat64())
				}
				indices[i] = i + 1
				pruned[i] = append([]float32(nil), dws[i]...)
				if m.Pruning == PruneOutliers {
					pruned[i] = outliersBySort(pruned[i], density, DefaultGamma)
				} else {
					pruned[i] = dellaBySort(pruned[i], rows, cols, 1, density, DefaultEpsilon, true, dellaSource(3, "mod", i+1))
				}
			}
			want := gtaReference(pruned, weights, m.TIES, name == "della", float32(lambda))
			got := g.combine(dws, weights, indices, "mod", rows, cols, 1)
			require.InDeltaSlice(t, toFloat64(want), toFloat64(got), 1e-5, "%s %v", name, weights)
		}
	}
}

func toFloat64(x []float32) []float64 {
	out := make([]float64, len(x))
	for i, v := range x {
		out[i] = float64(v)
	}
	return out
}

func TestGeneralizedValidation(t *testing.T) {
	f := func(v float64) *float64 { return &v }
	for _, c := range []struct {
		comb Combine
		msg  string
	}{
		{Combine{CombinationType: "breadcrumbs", Density: f(0.5), Gamma: f(-0.1)}, "gamma: "},
		{Combine{CombinationType: "breadcrumbs", Density: f(0.5), Gamma: f(1.5)}, "gamma: "},
		{Combine{CombinationType: "breadcrumbs", Density: f(0.5), Epsilon: f(0.1)}, `epsilon: combination_type "breadcrumbs" does not take epsilon`},
		{Combine{CombinationType: "della", Density: f(0.5), Gamma: f(0.1)}, `gamma: combination_type "della" does not take gamma`},
		{Combine{CombinationType: "ties_svd", Density: f(0.5), Gamma: f(0.1)}, "does not take gamma"},
		{Combine{CombinationType: "della", Density: f(0.1)}, "epsilon: must be chosen such that density +/- epsilon is in (0, 1)"},
		{Combine{CombinationType: "della", Density: f(0.5), Epsilon: f(0.5)}, "density +/- epsilon"},
		{Combine{CombinationType: "della_linear", Density: f(0.5), Epsilon: f(-0.1)}, "epsilon: must be a number >= 0"},
		{Combine{CombinationType: "della", Density: f(0.5), MajoritySignMethod: "frequency"}, "majority_sign_method"},
		{Combine{CombinationType: "della"}, "density: "},
		{Combine{CombinationType: "breadcrumbs"}, "density: "},
	} {
		err := c.comb.Validate()
		require.Error(t, err, "%+v", c.comb)
		assert.Contains(t, err.Error(), c.msg)
	}
	for _, c := range []Combine{
		{CombinationType: "della", Density: f(0.5), Epsilon: f(0)},
		{CombinationType: "della", Density: f(1), Epsilon: f(0.3)}, // density 1 prunes nothing: mergekit checks nothing
		{CombinationType: "breadcrumbs_ties", Density: f(0.9), Gamma: f(0.5), Lambda: f(2)},
	} {
		require.NoError(t, c.Validate(), "%+v", c)
	}
}

// The della row on the modules of adapter directories, at full svd_rank, equals the reference prune and
// combine of the dense updates.
func TestDellaRowOnAdapterDirectories(t *testing.T) {
	rng := rand.New(rand.NewPCG(4, 4))
	dir := t.TempDir()
	out, in, r := 24, 20, 4
	var dirs []string
	var srcMods []map[string]testutil.Module
	for i := range 3 {
		mods := map[string]testutil.Module{
			"m.layers.0.q": {A: testutil.RandTensor(rng, r, in), B: testutil.RandTensor(rng, out, r)},
			"m.layers.0.v": {A: testutil.RandTensor(rng, r, in), B: testutil.RandTensor(rng, out, r)},
		}
		srcMods = append(srcMods, mods)
		dirs = append(dirs, testutil.WriteAdapter(t, filepath.Join(dir, "a"+string(rune('0'+i))), nil, mods))
	}
	density, seed, svdRank := 0.5, uint64(7), linalg.RankSpec{Fixed: 20}
	weights := []float64{1, 0.5, -0.3}
	c := Combine{CombinationType: "della", Density: &density, Seed: &seed, SVDRank: &svdRank}
	require.NoError(t, c.Validate())
	loaded, err := adapter.LoadAll(dirs, false)
	require.NoError(t, err)
	t.Cleanup(func() {
		for _, a := range loaded {
			a.Close()
		}
	})
	for _, mod := range []string{"m.layers.0.q", "m.layers.0.v"} {
		dws := make([][]float32, 3)
		for i, mods := range srcMods {
			m := mods[mod]
			dws[i] = linalg.DenseDelta(m.A.Data, m.B.Data, out, r, in, 2) // alpha 8 / r 4: gomerge's own dW bits
			dws[i] = dellaBySort(dws[i], out, in, 1, density, DefaultEpsilon, true, dellaSource(seed, mod, i))
		}
		want := gtaReference(dws, []float32{1, 0.5, -0.3}, true, true, 1)
		var srcs []Source
		for i, a := range loaded {
			srcs = append(srcs, Source{Weight: weights[i], Mod: a.Modules[mod], Index: i})
		}
		o, err := c.Method().Merge(context.Background(), &ModuleJob{Name: mod, Srcs: srcs, In: in, Out: out}, &c, svdRank.Fixed)
		require.NoError(t, err)
		got := testutil.Product(o.a, o.b, out, 20, in)
		scale := 0.0
		for _, v := range want {
			scale = max(scale, math.Abs(float64(v)))
		}
		for e := range want {
			require.InDelta(t, want[e], got[e], 1e-5*scale, "%s[%d]", mod, e)
		}
	}
}
