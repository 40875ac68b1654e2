package gomerge

import (
	"errors"
	"io/fs"

	"github.com/nlpodyssey/safetensors"
)

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
	buf   []float32 // a merge result's float32 memory, recycled once written
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
