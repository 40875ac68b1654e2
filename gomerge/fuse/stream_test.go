package fuse

import (
	"bytes"
	"context"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/require"

	"gomerge/gomerge/internal/testutil"
	"gomerge/gomerge/safetensors"
)

// A streamed fuse (a block of rows at a time) writes the same bytes as the
// whole-tensor path, whatever the block: one block per tensor, or one row
// per block, for BF16, F16 and F32 bases, an output dtype other than the
// base's, and both layouts (Linear; fan_in_fan_out, whose update is
// transposed).
func TestStreamedFuseIsTheWholeTensorFuse(t *testing.T) {
	rng := rand.New(rand.NewPCG(19, 7))
	const d, r = 24, 4
	root := t.TempDir()
	q := testutil.Module{A: testutil.RandTensor(rng, r, d), B: testutil.RandTensor(rng, 40, r)}
	ad := testutil.WriteAdapter(t, filepath.Join(root, "a"), map[string]any{"r": r, "lora_alpha": 8,
		"target_modules": []string{"q"}}, map[string]testutil.Module{"model.q": q})
	up := testutil.Module{A: testutil.RandTensor(rng, r, d), B: testutil.RandTensor(rng, 36, r)}
	fifo := testutil.WriteAdapter(t, filepath.Join(root, "fifo"), map[string]any{"r": r, "lora_alpha": 2, "fan_in_fan_out": true,
		"target_modules": []string{"up"}}, map[string]testutil.Module{"model.up": up})
	defer func(b int, on bool) { streamBlock, streamTensors = b, on }(streamBlock, streamTensors)
	for _, dt := range []safetensors.DType{safetensors.BF16, safetensors.F16, safetensors.F32} {
		for _, outDType := range []string{"", "float16"} {
			base := writeTestBase(t, filepath.Join(root, "base-"+string(dt)), `{}`, dt, map[string]*testutil.Tensor{
				"model.q.weight":    testutil.RandTensor(rng, 40, d),
				"model.up.weight":   testutil.RandTensor(rng, d, 36), // fan_in_fan_out: in x out
				"model.norm.weight": testutil.RandTensor(rng, d),
			})
			var outputs [][]byte
			for i, c := range []struct {
				stream bool
				block  int
			}{{false, 1 << 20}, {true, 1 << 20}, {true, 1}, {true, 3 * d}} {
				streamTensors, streamBlock = c.stream, c.block
				out := filepath.Join(root, "out", string(dt)+outDType, string(rune('a'+i)))
				_, err := Fuse(context.Background(), Options{Base: base, Adapters: []string{ad, fifo}, Stack: true, OutputDir: out, DType: outDType}, nil)
				require.NoError(t, err)
				b, err := os.ReadFile(filepath.Join(out, "model.safetensors"))
				require.NoError(t, err)
				outputs = append(outputs, b)
			}
			for i := 1; i < len(outputs); i++ {
				require.True(t, bytes.Equal(outputs[0], outputs[i]), "%s base, dtype %q: streamed output %d differs from the whole-tensor fuse", dt, outDType, i)
			}
		}
	}
}
