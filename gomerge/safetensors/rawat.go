package safetensors

import (
	"golang.org/x/sys/unix"

	"gomerge/gomerge/errs"
)

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

// Prefetch asks the kernel to start reading n stored bytes of tensor name
// from byte off of its data into the page cache, in the background (a
// hint: nothing is returned, an unknown name or range is ignored), so that
// a ReadRawAt of them that follows finds them in memory.
func (s *File) Prefetch(name string, off, n int64) {
	e, ok := s.Entries[name]
	if !ok || off < 0 || n <= 0 || off+n > e.Length {
		return
	}
	_ = unix.Fadvise(int(s.f.Fd()), s.dataStart+e.Offset+off, n, unix.FADV_WILLNEED)
}
