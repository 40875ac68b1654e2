package gomerge

import (
	"bufio"
	"errors"
	"fmt"
	"io/fs"
	"os"

	"github.com/nlpodyssey/safetensors"
)

// Tensor is a float32 tensor in row-major order.
type Tensor struct {
	Shape []int
	Data  []float32
}

// NumElements returns the product of the shape.
func (t *Tensor) NumElements() int { return numel(t.Shape) }

func numel(shape []int) int {
	n := 1
	for _, d := range shape {
		n *= d
	}
	return n
}

// RawTensor is a tensor as stored: its bytes in memory (Data), or a place
// in an open safetensors file that is read when the tensor is needed.
type RawTensor struct {
	DType DType
	Shape []int
	Data  []byte
	src   *STFile
	name  string
	size  int64
}

// ByteLen is the size of the stored tensor in bytes.
func (t RawTensor) ByteLen() int64 {
	if t.src != nil {
		return t.size
	}
	return int64(len(t.Data))
}

var stDTypes = map[safetensors.DType]DType{
	safetensors.F32:  F32,
	safetensors.BF16: BF16,
	safetensors.F16:  F16,
}

// WriteSafetensors writes tensors (already encoded) to path with the given
// metadata, through a buffered writer, and syncs the file.
func WriteSafetensors(path string, tensors map[string]RawTensor, metadata map[string]string) error {
	views := make(map[string]safetensors.TensorView, len(tensors))
	rev := map[DType]safetensors.DType{F32: safetensors.F32, BF16: safetensors.BF16, F16: safetensors.F16}
	for name, t := range tensors {
		shape := make([]uint64, len(t.Shape))
		for i, d := range t.Shape {
			shape[i] = uint64(d)
		}
		v, err := safetensors.NewTensorView(rev[t.DType], shape, t.Data)
		if err != nil {
			return fmt.Errorf("tensor %s: %w", name, err)
		}
		views[name] = v
	}
	f, err := os.Create(path)
	if err != nil {
		return ioErr(path, err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	err = safetensors.SerializeToWriter(views, metadata, w)
	if err == nil {
		err = w.Flush()
	}
	return syncClose(f, path, err)
}

// ioErr turns an os error on path into a typed Error.
func ioErr(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return newErr(KindFileNotFound, "%s: no such file or directory", path)
	case errors.Is(err, fs.ErrExist):
		return newErr(KindFileExists, "%s: already exists", path)
	}
	return newErr(KindOS, "%s: %v", path, err)
}
