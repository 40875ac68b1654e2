package gomerge

import "gomerge/gomerge/safetensors"

// The storage types of package safetensors, under the names the engine uses.

// DType is a floating-point storage type of adapter tensors.
type DType = safetensors.DType

// The storage types gomerge reads and writes, named as in safetensors.
const (
	F32  = safetensors.F32
	BF16 = safetensors.BF16
	F16  = safetensors.F16
)

// RawTensor is a tensor as stored: its bytes in memory (Data), or a place
// in an open safetensors file that is read when the tensor is needed.
type RawTensor = safetensors.RawTensor
