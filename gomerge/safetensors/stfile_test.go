package safetensors

import (
	"encoding/binary"
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

// The header Writer writes is byte for byte json.Marshal's encoding of
// the same maps (sorted keys, "__metadata__" in its sorted place, HTML
// characters escaped), and the file reads back.
func TestCreateSafetensorsHeader(t *testing.T) {
	tensors := []OutTensor{
		{Name: "base.z<&>", DType: F16, Shape: []int{2, 3}},
		{Name: "A.weight", DType: F32, Shape: []int{4}},
		{Name: "_a", DType: BF16, Shape: []int{}},
		{Name: "base.a", DType: F32, Shape: []int{1, 2, 1}},
	}
	meta := map[string]string{"format": "pt", "b": "x\"y"}
	path := filepath.Join(t.TempDir(), "t.safetensors")
	w, err := Create(path, tensors, meta)
	require.NoError(t, err)
	want := map[string]any{"__metadata__": meta}
	pos := 0
	for _, name := range []string{"A.weight", "_a", "base.a", "base.z<&>"} {
		for _, tt := range tensors {
			if tt.Name == name {
				n := Numel(tt.Shape) * tt.DType.Size()
				want[name] = map[string]any{"dtype": writeDTypes[tt.DType], "shape": tt.Shape, "data_offsets": [2]int{pos, pos + n}}
				require.NoError(t, w.WriteTensor(name, make([]byte, n)))
				pos += n
			}
		}
	}
	require.NoError(t, w.Close())
	wantJSON, err := json.Marshal(want)
	require.NoError(t, err)
	raw, err := os.ReadFile(path)
	require.NoError(t, err)
	n := binary.LittleEndian.Uint64(raw)
	assert.Equal(t, string(wantJSON), string(raw[8:8+len(wantJSON)]))
	assert.Zero(t, n%8)
	st, err := Open(path)
	require.NoError(t, err)
	defer st.Close()
	assert.Equal(t, meta, st.Metadata)
	assert.Len(t, st.Entries, 4)
	assert.Equal(t, []int{1, 2, 1}, st.Entries["base.a"].Shape)
}

// A tensor written in parts reads back whole; a part outside it is refused.
func TestWriteTensorPart(t *testing.T) {
	path := filepath.Join(t.TempDir(), "p.safetensors")
	w, err := Create(path, []OutTensor{{Name: "x", DType: BF16, Shape: []int{5}}}, nil)
	require.NoError(t, err)
	x := []float32{1, 2, 3, 4, 5}
	require.NoError(t, w.WriteTensorPart("x", 4, Encode(BF16, x[2:])))
	require.NoError(t, w.WriteTensorPart("x", 0, Encode(BF16, x[:2])))
	require.Error(t, w.WriteTensorPart("x", 8, Encode(BF16, x[:2])))
	require.NoError(t, w.Close())
	st, err := Open(path)
	require.NoError(t, err)
	defer st.Close()
	got, err := st.ReadFloat32("x")
	require.NoError(t, err)
	assert.Equal(t, x, got)
}

func TestOpenReadsQuantizedDTypes(t *testing.T) {
	dir := t.TempDir()
	cases := []struct {
		name, header string
		ok           bool
	}{
		{"fp8", `{"w":{"dtype":"F8_E4M3","shape":[2,4],"data_offsets":[0,8]},"x":{"dtype":"F8_E5M2","shape":[8],"data_offsets":[8,16]}}`, true},
		{"ints", `{"a":{"dtype":"U8","shape":[8],"data_offsets":[0,8]},"b":{"dtype":"I8","shape":[4],"data_offsets":[8,12]},"c":{"dtype":"I32","shape":[1],"data_offsets":[12,16]}}`, true},
		{"fp8-size", `{"w":{"dtype":"F8_E4M3","shape":[3,4],"data_offsets":[0,16]}}`, false},
		{"i32-size", `{"w":{"dtype":"I32","shape":[3],"data_offsets":[0,16]}}`, false},
		{"unknown", `{"w":{"dtype":"F8_E3M4","shape":[16],"data_offsets":[0,16]}}`, false},
	}
	for _, c := range cases {
		path := filepath.Join(dir, c.name+".safetensors")
		b := make([]byte, 8)
		binary.LittleEndian.PutUint64(b, uint64(len(c.header)))
		require.NoError(t, os.WriteFile(path, append(append(b, c.header...), make([]byte, 16)...), 0o644))
		st, err := Open(path)
		if !c.ok {
			assert.Error(t, err, c.name)
			continue
		}
		require.NoError(t, err, c.name)
		for name, e := range st.Entries {
			assert.Equal(t, DType(""), e.DType, "%s is read as stored", name)
			raw, err := st.ReadRaw(name, nil)
			require.NoError(t, err)
			n, _ := RawDTypeSize(e.RawDType)
			assert.Len(t, raw, n*Numel(e.Shape))
		}
		st.Close()
	}
}
