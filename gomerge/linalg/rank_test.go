package linalg

import (
	"encoding/json"
	"math"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestRankSpecJSON(t *testing.T) {
	for _, tc := range []struct {
		in   string
		want RankSpec
		err  string
	}{
		{`16`, RankSpec{Fixed: 16}, ""},
		{`"16"`, RankSpec{Fixed: 16}, ""},
		{`"energy:0.99"`, RankSpec{Energy: 0.99}, ""},
		{`" energy: 1 "`, RankSpec{Energy: 1}, ""},
		{`"energy:0"`, RankSpec{}, "must be in (0, 1]"},
		{`"energy:1.5"`, RankSpec{}, "must be in (0, 1]"},
		{`"energy:x"`, RankSpec{}, "needs a fraction"},
		{`"big"`, RankSpec{}, "neither an integer nor an energy rule"},
		{`true`, RankSpec{}, "expected an integer or a string"},
	} {
		var r RankSpec
		err := json.Unmarshal([]byte(tc.in), &r)
		if tc.err != "" {
			require.Error(t, err, tc.in)
			assert.Contains(t, err.Error(), tc.err, tc.in)
			continue
		}
		require.NoError(t, err, tc.in)
		assert.Equal(t, tc.want, r, tc.in)
		back, err := json.Marshal(r)
		require.NoError(t, err)
		var again RankSpec
		require.NoError(t, json.Unmarshal(back, &again))
		assert.Equal(t, r, again, "round trip of %s", tc.in)
	}
}

func TestRankRuleChoose(t *testing.T) {
	s := []float64{4, 2, 1, 1} // squared: 16, 4, 1, 1 of 22
	for _, tc := range []struct {
		name string
		rule RankRule
		want int
	}{
		{"fixed", RankRule{Fixed: 3}, 3},
		{"fixed beyond the spectrum", RankRule{Fixed: 9}, 9},
		{"energy of the first value", RankRule{Energy: 16.0 / 22}, 1},
		{"just above it", RankRule{Energy: 16.5 / 22}, 2},
		{"all", RankRule{Energy: 1}, 4},
		{"capped", RankRule{Energy: 1, Max: 2}, 2},
	} {
		assert.Equal(t, tc.want, tc.rule.Choose(s), tc.name)
	}
	assert.Equal(t, 1, RankRule{Energy: 0.9}.Choose([]float64{0, 0}), "a zero update keeps rank 1")
	assert.InDelta(t, math.Sqrt(2.0/22), TruncationError(s, 2), 1e-15)
	assert.Equal(t, 0.0, TruncationError(s, 4))
	assert.Equal(t, 0.0, TruncationError([]float64{0}, 0))
}
