package safetensors

import stlib "github.com/nlpodyssey/safetensors"

// Numel is the number of elements of a tensor of this shape (1 for a
// scalar).
func Numel(shape []int) int {
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
	src   *File
	name  string
	size  int64
}

// Tensor returns tensor name of s as a RawTensor that is read from s when
// it is needed (ReadFloat32Into).
func (s *File) Tensor(name string) RawTensor {
	e := s.Entries[name]
	return RawTensor{DType: e.DType, Shape: e.Shape, src: s, name: name, size: e.Length}
}

// File is the open file that the tensor is read from, nil for a tensor in
// memory (Data).
func (t RawTensor) File() *File { return t.src }

// Name is the tensor's name in its File ("" for a tensor in memory).
func (t RawTensor) Name() string { return t.name }

// ByteLen is the size of the stored tensor in bytes.
func (t RawTensor) ByteLen() int64 {
	if t.src != nil {
		return t.size
	}
	return int64(len(t.Data))
}

var stDTypes = map[stlib.DType]DType{
	stlib.F32:  F32,
	stlib.BF16: BF16,
	stlib.F16:  F16,
}
