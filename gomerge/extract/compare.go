package extract

// The modules that are not factorised: compared, and saved whole when asked or changed.

import (
	"bytes"
	"slices"

	"gomerge/gomerge/adapter"
	"gomerge/gomerge/internal/pool"
	"gomerge/gomerge/modelfolder"
	"gomerge/gomerge/safetensors"
)

// compareModule compares a module's tensors and, when it is to be saved,
// returns the fine-tune's tensors as they are stored, under PEFT's names
// for modules_to_save (base_model.model.<name>).
func compareModule(j *extractJob, base, ft *modelfolder.Folder) (extractOutcome, error) {
	var o extractOutcome
	type saved struct {
		t    safetensors.OutTensor
		data []byte
	}
	var keep []saved
	for _, name := range j.tensors {
		be, _ := base.Info(name)
		fe, _ := ft.Info(name)
		if be.DType == fe.DType { // the stored bytes decide, read in pieces: no conversion, no whole copies
			same, err := sameStored(name, fe.Bytes, base, ft)
			if err != nil {
				return o, err
			}
			o.changed = o.changed || !same
		} else {
			wb, wf, err := readPair(name, base, ft)
			if err != nil {
				return o, err
			}
			o.changed = o.changed || !slices.Equal(wb, wf)
			pool.Put(wb)
			pool.Put(wf)
		}
		if j.save { // as the fine-tune stores it
			raw, err := ft.ReadRaw(name, nil)
			if err != nil {
				return o, err
			}
			keep = append(keep, saved{safetensors.OutTensor{Name: adapter.KeyPrefix + name, DType: fe.DType, Shape: fe.Shape}, raw})
		}
	}
	if j.save && (o.changed || j.named) {
		for _, s := range keep {
			o.tensors = append(o.tensors, s.t)
			o.data = append(o.data, s.data)
		}
	}
	return o, nil
}

// compareChunk is the piece of stored bytes that sameStored compares at a
// time.
const compareChunk = 4 << 20

// sameStored tells whether tensor name (size bytes in both folders) is
// stored with the same bytes in both.
func sameStored(name string, size int64, base, ft *modelfolder.Folder) (bool, error) {
	bb, fb := make([]byte, min(size, compareChunk)), make([]byte, min(size, compareChunk))
	for off := int64(0); off < size; off += compareChunk {
		n := min(size-off, compareChunk)
		if err := base.ReadRawAt(name, off, bb[:n]); err != nil {
			return false, err
		}
		if err := ft.ReadRawAt(name, off, fb[:n]); err != nil {
			return false, err
		}
		if !bytes.Equal(bb[:n], fb[:n]) {
			return false, nil
		}
	}
	return true, nil
}
