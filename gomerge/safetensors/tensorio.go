package safetensors

import (
	stlib "github.com/nlpodyssey/safetensors"
	"golang.org/x/sys/unix"

	"gomerge/gomerge/errs"
)

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

// CopyTensor writes tensor srcName of src, as stored, as tensor name of
// w: the bytes move between the files inside the kernel (copy_file_range)
// without passing through memory, with a plain read and write where the
// file systems cannot. The dtype and size must agree (checked).
func (w *Writer) CopyTensor(name string, src *File, srcName string, buf []byte) ([]byte, error) {
	e, ok := src.Entries[srcName]
	off, ok2 := w.offsets[name]
	if !ok || !ok2 || off[1]-off[0] != e.Length {
		return buf, errs.New(errs.KindInternal, "%s: tensor %s: cannot copy %s from %s (unknown name or size)", w.path, name, srcName, src.Path)
	}
	rOff, wOff, n := src.dataStart+e.Offset, w.start+off[0], e.Length
	for n > 0 {
		c, err := unix.CopyFileRange(int(src.f.Fd()), &rOff, w.fd, &wOff, int(min(n, 1<<30)), 0)
		if err != nil || c == 0 {
			break // not supported here (or a short copy): the rest goes through memory
		}
		n -= int64(c)
	}
	if n > 0 {
		done := e.Length - n
		if int64(cap(buf)) < n {
			buf = make([]byte, n)
		}
		b := buf[:n]
		if err := src.readAt(b, e.Offset+done, srcName); err != nil {
			return buf, err
		}
		if _, err := w.f.WriteAt(b, w.start+off[0]+done); err != nil {
			return buf, errs.IO(w.path, err)
		}
	}
	w.kick(int(e.Length))
	return buf, nil
}
