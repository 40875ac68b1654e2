package safetensors

import (
	"bufio"
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	stlib "github.com/nlpodyssey/safetensors"

	"gomerge/gomerge/errs"
)

// writeReference writes tensors with the reference library
// (nlpodyssey/safetensors), so that the tests read files this package did
// not write itself.
func writeReference(path string, tensors map[string]RawTensor, metadata map[string]string) error {
	views := make(map[string]stlib.TensorView, len(tensors))
	rev := map[DType]stlib.DType{F32: stlib.F32, BF16: stlib.BF16, F16: stlib.F16}
	for name, t := range tensors {
		shape := make([]uint64, len(t.Shape))
		for i, d := range t.Shape {
			shape[i] = uint64(d)
		}
		v, err := stlib.NewTensorView(rev[t.DType], shape, t.Data)
		if err != nil {
			return fmt.Errorf("tensor %s: %w", name, err)
		}
		views[name] = v
	}
	f, err := os.Create(path)
	if err != nil {
		return errs.IO(path, err)
	}
	w := bufio.NewWriterSize(f, 1<<20)
	err = stlib.SerializeToWriter(views, metadata, w)
	if err == nil {
		err = w.Flush()
	}
	return errs.SyncClose(f, path, err)
}

// seedSafetensors returns a valid two-tensor file written by the reference
// library, and crafted broken variants of it.
func seedSafetensors(t testing.TB) [][]byte {
	dir := t.TempDir()
	path := filepath.Join(dir, "x.safetensors")
	tensors := map[string]RawTensor{
		"base_model.model.m.lora_A.weight": {DType: F32, Shape: []int{2, 3}, Data: Encode(F32, []float32{1, 2, 3, 4, 5, 6})},
		"base_model.model.m.lora_B.weight": {DType: BF16, Shape: []int{4, 2}, Data: Encode(BF16, make([]float32, 8))},
	}
	if err := writeReference(path, tensors, map[string]string{"format": "pt"}); err != nil {
		t.Fatal(err)
	}
	good, _ := os.ReadFile(path)
	n := binary.LittleEndian.Uint64(good[:8])
	huge := append([]byte(nil), good...)
	binary.LittleEndian.PutUint64(huge[:8], 1<<40)
	beyond := append([]byte(nil), good...)
	binary.LittleEndian.PutUint64(beyond[:8], uint64(len(good)))
	header := func(h string) []byte {
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, uint64(len(h)))
		return append(append(b, h...), make([]byte, 16)...)
	}
	return [][]byte{
		good, good[:len(good)-3], good[:8+n], huge, beyond, {}, {1, 2, 3},
		header(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}`),
		header(`{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"a":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}`),
		header(`{"a":{"dtype":"F8_E4M3","shape":[16],"data_offsets":[0,16]}}`),
		header(`{"a":{"dtype":"F8_E4M3","shape":[4,2],"data_offsets":[0,8]},"b":{"dtype":"F8_E5M2","shape":[8],"data_offsets":[8,16]}}`),
		header(`{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[2,2],"data_offsets":[8,12]},"c":{"dtype":"I32","shape":[1],"data_offsets":[12,16]}}`),
		header(`{"a":{"dtype":"F8_E4M3","shape":[17],"data_offsets":[0,16]}}`),
		header(`{"a":{"dtype":"F8_E3M4","shape":[16],"data_offsets":[0,16]}}`),
		header(`{"a":{"dtype":"F32","shape":[4611686018427387904,4],"data_offsets":[0,16]}}`),
		header(`{"__metadata__":{"format":1}}`),
	}
}

// FuzzOpenSafetensors: any file is either refused with an error or read
// completely, never a panic or an out-of-bounds read.
func FuzzOpenSafetensors(f *testing.F) {
	for _, s := range seedSafetensors(f) {
		f.Add(s)
	}
	dir := f.TempDir()
	f.Fuzz(func(t *testing.T, data []byte) {
		path := filepath.Join(dir, "fuzz.safetensors")
		if err := os.WriteFile(path, data, 0o644); err != nil {
			t.Fatal(err)
		}
		st, err := Open(path)
		if err != nil {
			if errs.KindOf(err) == errs.KindInternal {
				t.Fatalf("untyped error: %v", err)
			}
			return
		}
		defer st.Close()
		st.AllowNonFinite = true
		for name, e := range st.Entries {
			if e.DType == "" { // integers and FP8: read as stored, their size checked against dtype and shape
				n, ok := RawDTypeSize(e.RawDType)
				raw, err := st.ReadRaw(name, nil)
				if !ok || err != nil || len(raw) != n*Numel(e.Shape) {
					t.Fatalf("a validated %s tensor failed to read: %v", e.RawDType, err)
				}
				continue
			}
			if _, err := st.ReadFloat32(name); err != nil {
				t.Fatalf("a validated tensor failed to read: %v", err)
			}
		}
	})
}
