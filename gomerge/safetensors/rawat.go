package safetensors

import "gomerge/gomerge/errs"

// ReadRawAt reads len(dst) stored bytes of tensor name from byte off of its
// data, so that a large tensor can be streamed in pieces.
func (s *File) ReadRawAt(name string, off int64, dst []byte) error {
	e, ok := s.Entries[name]
	if !ok {
		return errs.Value("%s: no tensor %s", s.Path, name)
	}
	if off < 0 || off+int64(len(dst)) > e.Length {
		return errs.Value("%s: tensor %s: bytes [%d, %d) are outside its %d bytes", s.Path, name, off, off+int64(len(dst)), e.Length)
	}
	if len(dst) == 0 {
		return nil
	}
	return s.readAt(dst, e.Offset+off, name)
}
