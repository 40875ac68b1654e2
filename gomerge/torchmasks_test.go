package gomerge

import (
	"context"
	"math/rand/v2"
	"slices"
	"testing"
	"unsafe"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/torchrng"
	"gomerge/gomerge/methods"
)

func byteAddress(buf []byte) uintptr { return uintptr(unsafe.Pointer(&buf[0])) }

// onHeap keeps what the tests hand to the engine as raw addresses: a buffer
// that does not escape may live on the goroutine's stack, which moves when it
// grows (Python's tensors never move).
var onHeap []any

func heapBytes(n int) []byte {
	b := make([]byte, n)
	onHeap = append(onHeap, b)
	return b
}

func heapFloats(n int) []float32 {
	b := nanBuffer(n)
	onHeap = append(onHeap, b)
	return b
}

// TestTorchMasksDrawnWhileMerging: masks drawn by the merge from a
// generator state (TorchMasks, while the modules merge) give the merge that
// the same masks given as buffers give, the masks are the generator's
// Bernoulli draws in order, and the state is advanced in place.
func TestTorchMasksDrawnWhileMerging(t *testing.T) {
	const in, out, r, modules = 40, 30, 4, 9
	rng := rand.New(rand.NewPCG(3, 4))
	factor := func(n int) []float32 {
		x := make([]float32, n)
		for i := range x {
			x[i] = float32(rng.NormFloat64())
		}
		return x
	}
	type src struct{ a, b []float32 }
	srcs := make([][2]src, modules)
	for m := range srcs {
		for i := range srcs[m] {
			srcs[m][i] = src{factor(r * in), factor(out * r)}
		}
	}
	per := 2 * (r*in + out*r) // masks per module: A then B of each source
	total := modules * per
	start := torchrng.Seeded(5)
	start.Uint32() // mid-block
	ref := *start
	want := heapBytes(total)
	require.NoError(t, ref.Bernoulli(want[:total/2], 0.2))
	require.NoError(t, ref.Bernoulli(want[total/2:], 0.2001953125)) // a bfloat16 0.2

	merge := func(masks []byte, tm *TorchMasks) ([]float32, *MemResult) {
		outA, outB := heapFloats(modules*r*in), heapFloats(modules*out*r)
		req := MemRequest{Combine: methods.Combine{CombinationType: "dare_linear", Density: new(0.2)}, Rank: r, TorchMasks: tm}
		for m := range modules {
			mod := MemModule{Name: "m", OutA: address(outA[m*r*in:]), OutB: address(outB[m*out*r:]), OutRank: r}
			off := m * per
			for i, s := range srcs[m] {
				mod.Sources = append(mod.Sources, MemSource{A: address(s.a), B: address(s.b), AShape: []int{r, in}, BShape: []int{out, r},
					Scaling: 1, Weight: 1 + float64(i), Index: i, MaskA: byteAddress(masks[off+i*r*in:])})
			}
			for i := range srcs[m] {
				mod.Sources[i].MaskB = byteAddress(masks[off+2*r*in+i*out*r:])
			}
			req.Modules = append(req.Modules, mod)
		}
		res, err := MergeTensors(context.Background(), req, nil)
		require.NoError(t, err)
		return append(outA, outB...), res
	}
	given, _ := merge(want, nil)
	state := &torchrng.MT19937{State: start.State}
	onHeap = append(onHeap, state)
	drawn := heapBytes(total)
	tm := &TorchMasks{State: uintptr(unsafe.Pointer(&state.State[0])), Pos: start.Pos,
		Out: byteAddress(drawn), Runs: []TorchRun{{N: total / 2, P: 0.2}, {N: total - total/2, P: 0.2001953125}}}
	got, res := merge(drawn, tm)
	assert.True(t, slices.Equal(want, drawn), "the masks")
	nan := func(x []float32) int {
		return len(x) - len(slices.DeleteFunc(slices.Clone(x), func(v float32) bool { return v != v }))
	}
	require.Zero(t, nan(given), "every output written")
	assert.True(t, slices.Equal(given, got), "the merge")
	require.NotNil(t, res.TorchPos)
	assert.Equal(t, ref.Pos, *res.TorchPos)
	assert.Equal(t, ref.State, state.State, "the state, advanced in place")
}

func TestTorchMasksRefusesBadRequests(t *testing.T) {
	state := heapFloats(torchrng.StateWords)
	buf := heapBytes(8)
	for name, tm := range map[string]TorchMasks{
		"probability above 1": {State: address(state), Pos: 1, Out: byteAddress(buf), Runs: []TorchRun{{N: 8, P: 1.5}}},
		"negative length":     {State: address(state), Pos: 1, Out: byteAddress(buf), Runs: []TorchRun{{N: -1, P: 0.5}}},
		"no state":            {Pos: 1, Out: byteAddress(buf), Runs: []TorchRun{{N: 8, P: 0.5}}},
		"position":            {State: address(state), Pos: 625, Out: byteAddress(buf), Runs: []TorchRun{{N: 8, P: 0.5}}},
	} {
		t.Run(name, func(t *testing.T) {
			_, err := MergeTensors(context.Background(), MemRequest{Combine: methods.Combine{CombinationType: "dare_linear",
				Density: new(0.5)}, Rank: 1, TorchMasks: &tm}, nil)
			var e *errs.Error
			require.ErrorAs(t, err, &e)
			assert.Equal(t, errs.KindValue, e.Kind)
			assert.Contains(t, e.Msg, "torch_masks")
		})
	}
}
