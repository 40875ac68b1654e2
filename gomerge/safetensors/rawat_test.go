package safetensors

import (
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestReadRawAt(t *testing.T) {
	path := filepath.Join(t.TempDir(), "t.safetensors")
	x := make([]float32, 100)
	for i := range x {
		x[i] = float32(i)
	}
	w, err := Create(path, []OutTensor{{Name: "a", DType: BF16, Shape: []int{10, 10}}, {Name: "b", DType: F32, Shape: []int{3}}}, nil)
	require.NoError(t, err)
	require.NoError(t, w.WriteTensor("a", Encode(BF16, x)))
	require.NoError(t, w.WriteTensor("b", Encode(F32, x[:3])))
	require.NoError(t, w.Close())
	f, err := Open(path)
	require.NoError(t, err)
	defer f.Close()
	whole, err := f.ReadRaw("a", nil)
	require.NoError(t, err)
	tests := []struct {
		name    string
		tensor  string
		off, n  int64
		wantErr string
	}{
		{name: "start", tensor: "a", off: 0, n: 7},
		{name: "middle", tensor: "a", off: 33, n: 100},
		{name: "to the end", tensor: "a", off: 150, n: 50},
		{name: "empty", tensor: "a", off: 200, n: 0},
		{name: "past the end", tensor: "a", off: 150, n: 51, wantErr: "outside its 200 bytes"},
		{name: "negative", tensor: "a", off: -1, n: 2, wantErr: "outside"},
		{name: "no such tensor", tensor: "c", n: 1, wantErr: "no tensor c"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			dst := make([]byte, tc.n)
			err := f.ReadRawAt(tc.tensor, tc.off, dst)
			if tc.wantErr != "" {
				require.Error(t, err)
				assert.Contains(t, err.Error(), tc.wantErr)
				return
			}
			require.NoError(t, err)
			assert.Equal(t, whole[tc.off:tc.off+tc.n], dst)
		})
	}
}
