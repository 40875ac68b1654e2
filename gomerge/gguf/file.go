package gguf

import (
	"encoding/binary"
	"math"
)

// GGMLType is a tensor type of ggml (the values of enum ggml_type).
type GGMLType uint32

// The tensor types the export writes.
const (
	TypeF32  GGMLType = 0
	TypeF16  GGMLType = 1
	TypeQ8_0 GGMLType = 8
	TypeBF16 GGMLType = 30
)

// String is the type's name in ggml.
func (t GGMLType) String() string {
	switch t {
	case TypeF16:
		return "f16"
	case TypeBF16:
		return "bf16"
	case TypeQ8_0:
		return "q8_0"
	}
	return "f32"
}

// bytes is the size in bytes of n values of type t (n a multiple of the
// block size for Q8_0).
func (t GGMLType) bytes(n int) int64 {
	switch t {
	case TypeF16, TypeBF16:
		return 2 * int64(n)
	case TypeQ8_0:
		return int64(n/q8Block) * q8BlockSize
	}
	return 4 * int64(n)
}

// fileType is general.file_type for an output type (llama_ftype).
func fileType(t GGMLType) uint32 {
	switch t {
	case TypeF16:
		return 1 // MOSTLY_F16
	case TypeQ8_0:
		return 7 // MOSTLY_Q8_0
	case TypeBF16:
		return 32 // MOSTLY_BF16
	}
	return 0 // ALL_F32
}

// The GGUF container, version 3: magic, version, tensor and metadata
// counts, the metadata, the tensor infos, then the data, each tensor
// aligned to Alignment bytes from the start of the data section.
const (
	magic     = "GGUF"
	version   = 3
	Alignment = 32
)

// GGUF metadata value types (enum gguf_type).
const (
	kvUint32  = 4
	kvFloat32 = 6
	kvString  = 8
)

// KV is one metadata entry: a string, a float32 or a uint32 value.
type KV struct {
	Key   string
	Value any
}

// TensorInfo is one tensor of the file: Dims in ggml's order (ne: the
// fastest-varying dimension first, so a numpy shape reversed), its type,
// and its data offset from the start of the data section.
type TensorInfo struct {
	Name   string
	Dims   []int
	Type   GGMLType
	Offset int64
}

// Size is the tensor's data size in bytes.
func (t *TensorInfo) Size() int64 {
	n := 1
	for _, d := range t.Dims {
		n *= d
	}
	return t.Type.bytes(n)
}

func align(n int64) int64 { return (n + Alignment - 1) / Alignment * Alignment }

// Header lays out the tensors (setting each Offset) and returns the bytes
// before the data section, padded to the alignment, and the data
// section's size (the last tensor padded too).
func Header(kvs []KV, tensors []TensorInfo) ([]byte, int64) {
	le := binary.LittleEndian
	str := func(b []byte, s string) []byte { return append(le.AppendUint64(b, uint64(len(s))), s...) }
	b := append([]byte(nil), magic...)
	b = le.AppendUint32(b, version)
	b = le.AppendUint64(b, uint64(len(tensors)))
	b = le.AppendUint64(b, uint64(len(kvs)))
	for _, kv := range kvs {
		b = str(b, kv.Key)
		switch v := kv.Value.(type) {
		case string:
			b = str(le.AppendUint32(b, kvString), v)
		case float32:
			b = le.AppendUint32(le.AppendUint32(b, kvFloat32), math.Float32bits(v))
		case uint32:
			b = le.AppendUint32(le.AppendUint32(b, kvUint32), v)
		default:
			panic("gguf: unsupported metadata value type")
		}
	}
	var off int64
	for i := range tensors {
		t := &tensors[i]
		t.Offset = off
		off = align(off + t.Size())
		b = str(b, t.Name)
		b = le.AppendUint32(b, uint32(len(t.Dims)))
		for _, d := range t.Dims {
			b = le.AppendUint64(b, uint64(d))
		}
		b = le.AppendUint32(b, uint32(t.Type))
		b = le.AppendUint64(b, uint64(t.Offset))
	}
	for int64(len(b))%Alignment != 0 {
		b = append(b, 0)
	}
	return b, off
}
