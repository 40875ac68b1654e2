package gomerge

import (
	"context"
	"math"
	"slices"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/methods"
)

func nanBuffer(n int) []float32 {
	buf := make([]float32, n)
	for i := range buf {
		buf[i] = float32(math.NaN())
	}
	return buf
}

func address(buf []float32) uintptr { return uintptr(unsafe.Pointer(&buf[0])) }

// TestMergeTensorsWritesWholeOutputs checks the in-memory merge's contract
// with its caller: every element of the output buffers is written, the
// merged factors and zeros beyond the merged rank, so the buffers may hold
// anything before (the drop-in passes the new adapter's initialised tensors).
func TestMergeTensorsWritesWholeOutputs(t *testing.T) {
	const in, out, r = 3, 4, 2
	a := [][]float32{{1, 2, 3, 4, 5, 6}, {-1, 0.5, 2, 0, 1, -3}}
	b := [][]float32{{1, 2, 3, 4, 5, 6, 7, 8}, {-8, 7, -6, 5, -4, 3, -2, 1}}
	merge := func(ct string, rank, outRank int) ([]float32, []float32) {
		outA, outB := nanBuffer(outRank*in), nanBuffer(out*outRank)
		mod := MemModule{Name: "m", OutA: address(outA), OutB: address(outB), OutRank: outRank}
		for i := range a {
			mod.Sources = append(mod.Sources, MemSource{A: address(a[i]), B: address(b[i]), AShape: []int{r, in},
				BShape: []int{out, r}, Scaling: 0.5 + float64(i), Weight: 2 - float64(i), Index: i})
		}
		_, err := MergeTensors(context.Background(), MemRequest{Combine: methods.Combine{CombinationType: ct}, Rank: rank, Modules: []MemModule{mod}}, nil)
		require.NoError(t, err)
		return outA, outB
	}
	tests := []struct {
		ct           string
		rank, merged int // the merge's rank, and the rank of its result
	}{
		{"linear", r, r},
		{"svd", r, r},
		{"cat", 2 * r, 2 * r},
	}
	for _, tt := range tests {
		t.Run(tt.ct, func(t *testing.T) {
			wantA, wantB := merge(tt.ct, tt.rank, tt.merged) // buffers of exactly the result's rank
			const extra = 3
			gotA, gotB := merge(tt.ct, tt.rank, tt.merged+extra)
			assert.Equal(t, wantA, gotA[:len(wantA)], "A's merged rows")
			assert.Equal(t, make([]float32, extra*in), gotA[len(wantA):], "A's rows beyond the merged rank are zero")
			for o := 0; o < out; o++ {
				row := gotB[o*(tt.merged+extra) : (o+1)*(tt.merged+extra)]
				assert.Equal(t, wantB[o*tt.merged:(o+1)*tt.merged], row[:tt.merged], "B's row %d", o)
				assert.Equal(t, make([]float32, extra), row[tt.merged:], "B's columns beyond the merged rank are zero")
			}
			assert.False(t, slices.ContainsFunc(wantA, func(x float32) bool { return x != x }), "no NaN left")
		})
	}
}
