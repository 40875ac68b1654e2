package modelfolder

import "gomerge/gomerge/errs"

// ReadRawAt reads len(dst) stored bytes of tensor name from byte off of its
// data (see safetensors.File.ReadRawAt), whatever its dtype.
func (f *Folder) ReadRawAt(name string, off int64, dst []byte) error {
	t, ok := f.info[name]
	if !ok {
		return errs.Value("%s: the model has no tensor %s", f.Dir, name)
	}
	return f.files[t.Shard].ReadRawAt(name, off, dst)
}

// Prefetch starts reading n stored bytes of tensor name from byte off of
// its data in the background (see safetensors.File.Prefetch; a hint).
func (f *Folder) Prefetch(name string, off, n int64) {
	if t, ok := f.info[name]; ok {
		f.files[t.Shard].Prefetch(name, off, n)
	}
}
