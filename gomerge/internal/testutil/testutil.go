// Package testutil holds the helpers that the engine's tests share: float32
// tensors, random factors, adapter directories and safetensors files
// written with the reference library, and dense products.
package testutil

import (
	"bufio"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	stlib "github.com/nlpodyssey/safetensors"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/errs"
	"gomerge/gomerge/linalg"
	"gomerge/gomerge/safetensors"
)

// Module is one LoRA module of a test adapter: its A and B factors, whether
// it is an embedding, and its storage type (default F32).
type Module struct {
	A, B  *Tensor
	Embed bool
	DType safetensors.DType
}

// RandTensor is a tensor of the given shape with standard normal values.
func RandTensor(rng *rand.Rand, shape ...int) *Tensor {
	t := &Tensor{Shape: shape, Data: make([]float32, safetensors.Numel(shape))}
	for i := range t.Data {
		t.Data[i] = float32(rng.NormFloat64())
	}
	return t
}

// WriteAdapter writes an adapter directory with the given config keys
// (merged over a minimal LoRA config) and modules.
func WriteAdapter(t testing.TB, dir string, cfg map[string]any, mods map[string]Module) string {
	t.Helper()
	require.NoError(t, os.MkdirAll(dir, 0o755))
	full := map[string]any{"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": []string{"q", "k", "v"}}
	for k, v := range cfg {
		full[k] = v
	}
	b, err := json.Marshal(full)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(filepath.Join(dir, adapter.ConfigFile), b, 0o644))
	tensors := map[string]safetensors.RawTensor{}
	for name, m := range mods {
		kind := adapter.KindLinear
		if m.Embed {
			kind = adapter.KindEmbedding
		}
		ak, bk := adapter.ModuleKeys(name, kind)
		dt := m.DType
		if dt == "" {
			dt = safetensors.F32
		}
		tensors[ak] = safetensors.RawTensor{DType: dt, Shape: m.A.Shape, Data: safetensors.Encode(dt, m.A.Data)}
		tensors[bk] = safetensors.RawTensor{DType: dt, Shape: m.B.Shape, Data: safetensors.Encode(dt, m.B.Data)}
	}
	require.NoError(t, WriteSafetensors(filepath.Join(dir, adapter.WeightsFile), tensors, map[string]string{"format": "pt"}))
	return dir
}

// Product returns B @ A (Out x In) in float64 for 2-D views of the factors.
func Product(a, b []float32, out, r, in int) []float64 {
	p := make([]float64, out*in)
	for i := 0; i < out; i++ {
		for k := 0; k < r; k++ {
			bv := float64(b[i*r+k])
			for j := 0; j < in; j++ {
				p[i*in+j] += bv * float64(a[k*in+j])
			}
		}
	}
	return p
}

// Tensor is a float32 tensor in row-major order.
type Tensor struct {
	Shape []int
	Data  []float32
}

// WriteSafetensors writes tensors with the reference library (nlpodyssey/safetensors), so that the tests read
// files gomerge did not write itself.
func WriteSafetensors(path string, tensors map[string]safetensors.RawTensor, metadata map[string]string) error {
	views := make(map[string]stlib.TensorView, len(tensors))
	rev := map[safetensors.DType]stlib.DType{safetensors.F32: stlib.F32, safetensors.BF16: stlib.BF16, safetensors.F16: stlib.F16}
	for name, t := range tensors {
		shape := make([]uint64, len(t.Shape))
		for i, d := range t.Shape {
			shape[i] = uint64(d)
		}
		v, err := stlib.NewTensorView(rev[t.DType], shape, t.Data)
		if err != nil {
			return fmt.Errorf("tensor %s: %w", name, err)
		}
		views[name] = v
	}
	f, err := os.Create(path)
	if err != nil {
		return errs.IO(path, err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	err = stlib.SerializeToWriter(views, metadata, w)
	if err == nil {
		err = w.Flush()
	}
	return errs.SyncClose(f, path, err)
}

// Orthonormal is a random rows x cols matrix with orthonormal columns.
func Orthonormal(rng *rand.Rand, rows, cols int) []float64 {
	x := make([]float64, rows*cols)
	for i := range x {
		x[i] = rng.NormFloat64()
	}
	q, _, _ := linalg.ThinQR(x, rows, cols)
	return q
}
