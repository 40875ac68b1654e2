package modelfolder

import (
	"encoding/json"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/safetensors"
)

// tensor is one tensor of a test shard: float32 values stored as dtype.
type tensor struct {
	name  string
	dtype safetensors.DType
	shape []int
	vals  []float32
}

func writeShard(t *testing.T, path string, ts ...tensor) {
	t.Helper()
	outs := make([]safetensors.OutTensor, len(ts))
	for i, x := range ts {
		outs[i] = safetensors.OutTensor{Name: x.name, DType: x.dtype, Shape: x.shape}
	}
	w, err := safetensors.Create(path, outs, map[string]string{"format": "pt"})
	require.NoError(t, err)
	for _, x := range ts {
		require.NoError(t, w.WriteTensor(x.name, safetensors.Encode(x.dtype, x.vals)))
	}
	require.NoError(t, w.Close())
}

func writeJSON(t *testing.T, path string, v any) {
	t.Helper()
	b, err := json.Marshal(v)
	require.NoError(t, err)
	require.NoError(t, os.WriteFile(path, b, 0o644))
}

// shardedFolder writes a two-shard model folder with a tokenizer file.
func shardedFolder(t *testing.T) string {
	dir := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(dir, ConfigFile), []byte(`{"model_type": "llama", "tie_word_embeddings": false, "rms_norm_eps": 1e-05}`), 0o644))
	writeShard(t, filepath.Join(dir, "model-00001-of-00002.safetensors"),
		tensor{"a.weight", safetensors.BF16, []int{2, 3}, []float32{1, 2, 3, 4, 5, 6}},
		tensor{"b.weight", safetensors.F32, []int{3}, []float32{1, -1, 0.5}})
	writeShard(t, filepath.Join(dir, "model-00002-of-00002.safetensors"),
		tensor{"c.weight", safetensors.F16, []int{2}, []float32{0.25, -2}})
	writeJSON(t, filepath.Join(dir, IndexFile), map[string]any{
		"metadata":   map[string]any{"total_size": 12 + 12 + 4},
		"weight_map": map[string]string{"a.weight": "model-00001-of-00002.safetensors", "b.weight": "model-00001-of-00002.safetensors", "c.weight": "model-00002-of-00002.safetensors"},
	})
	require.NoError(t, os.WriteFile(filepath.Join(dir, "tokenizer.json"), []byte(`{"x":1}`), 0o644))
	return dir
}

func TestOpenSharded(t *testing.T) {
	dir := shardedFolder(t)
	f, err := Open(dir)
	require.NoError(t, err)
	defer f.Close()
	assert.True(t, f.Sharded())
	assert.Equal(t, []string{"a.weight", "b.weight", "c.weight"}, f.Names())
	assert.Equal(t, []Shard{
		{Name: "model-00001-of-00002.safetensors", Tensors: []string{"a.weight", "b.weight"}},
		{Name: "model-00002-of-00002.safetensors", Tensors: []string{"c.weight"}},
	}, f.Shards())
	info, ok := f.Info("a.weight")
	require.True(t, ok)
	assert.Equal(t, safetensors.BF16, info.DType)
	assert.Equal(t, []int{2, 3}, info.Shape)
	x, shape, err := f.ReadFloat32("a.weight")
	require.NoError(t, err)
	assert.Equal(t, []int{2, 3}, shape)
	assert.Equal(t, []float32{1, 2, 3, 4, 5, 6}, x)
	x, _, err = f.ReadFloat32("c.weight")
	require.NoError(t, err)
	assert.Equal(t, []float32{0.25, -2}, x)
	assert.Equal(t, "llama", f.Config()["model_type"])
	assert.Equal(t, json.Number("1e-05"), f.Config()["rms_norm_eps"])
	others, err := f.OtherFiles()
	require.NoError(t, err)
	assert.Equal(t, []string{ConfigFile, "tokenizer.json"}, others)
	_, _, err = f.ReadFloat32("nope")
	assert.Equal(t, errs.KindValue, errs.KindOf(err))
}

func TestOpenSingleFile(t *testing.T) {
	dir := t.TempDir()
	writeJSON(t, filepath.Join(dir, ConfigFile), map[string]any{})
	w, err := safetensors.Create(filepath.Join(dir, SingleFile), []safetensors.OutTensor{
		{Name: "w", DType: safetensors.F32, Shape: []int{2}}, {Name: "ids", RawDType: "I64", Shape: []int{2}}}, nil)
	require.NoError(t, err)
	require.NoError(t, w.WriteTensor("w", safetensors.Encode(safetensors.F32, []float32{1, 2})))
	ids := []byte{1, 0, 0, 0, 0, 0, 0, 0, 2, 0, 0, 0, 0, 0, 0, 0}
	require.NoError(t, w.WriteTensor("ids", ids))
	require.NoError(t, w.Close())
	f, err := Open(dir)
	require.NoError(t, err)
	defer f.Close()
	assert.False(t, f.Sharded())
	assert.Equal(t, []Shard{{Name: SingleFile, Tensors: []string{"ids", "w"}}}, f.Shards())
	info, _ := f.Info("ids")
	assert.Equal(t, "I64", info.RawDType)
	assert.Equal(t, safetensors.DType(""), info.DType)
	raw, err := f.ReadRaw("ids", nil)
	require.NoError(t, err)
	assert.Equal(t, ids, raw)
	_, _, err = f.ReadFloat32("ids")
	require.Error(t, err)
	assert.Contains(t, err.Error(), "I64")
}

// A folder given by a relative path opens as by its absolute one.
func TestOpenRelativePath(t *testing.T) {
	dir := t.TempDir()
	writeJSON(t, filepath.Join(dir, ConfigFile), map[string]any{})
	w, err := safetensors.Create(filepath.Join(dir, SingleFile), []safetensors.OutTensor{
		{Name: "w", DType: safetensors.F32, Shape: []int{2}}}, nil)
	require.NoError(t, err)
	require.NoError(t, w.WriteTensor("w", safetensors.Encode(safetensors.F32, []float32{1, 2})))
	require.NoError(t, w.Close())
	t.Chdir(filepath.Dir(dir))
	f, err := Open(filepath.Base(dir))
	require.NoError(t, err)
	defer f.Close()
	got, _, err := f.ReadFloat32("w")
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2}, got)
}

// Hostile folders: each is refused with the right error kind and a message
// naming the culprit.
func TestOpenHostile(t *testing.T) {
	outside := t.TempDir()
	writeShard(t, filepath.Join(outside, "x.safetensors"), tensor{"a.weight", safetensors.BF16, []int{2, 3}, make([]float32, 6)})
	index := func(dir string, wm map[string]string) {
		writeJSON(t, filepath.Join(dir, IndexFile), map[string]any{"metadata": map[string]any{"total_size": 0}, "weight_map": wm})
	}
	s1, s2 := "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
	cases := []struct {
		name   string
		mutate func(dir string)
		kind   errs.ErrKind
		want   string
	}{
		{"dotdot shard", func(d string) {
			index(d, map[string]string{"a.weight": "../x.safetensors"})
		}, errs.KindValue, "../x.safetensors"},
		{"absolute shard", func(d string) {
			index(d, map[string]string{"a.weight": filepath.Join(outside, "x.safetensors")})
		}, errs.KindValue, "outside the model folder"},
		{"symlink out", func(d string) {
			require.NoError(t, os.Remove(filepath.Join(d, s1)))
			require.NoError(t, os.Symlink(filepath.Join(outside, "x.safetensors"), filepath.Join(d, s1)))
		}, errs.KindValue, "symlink"},
		{"missing shard", func(d string) {
			require.NoError(t, os.Remove(filepath.Join(d, s2)))
		}, errs.KindFileNotFound, s2},
		{"tensor in two shards", func(d string) {
			writeShard(t, filepath.Join(d, s2), tensor{"c.weight", safetensors.F16, []int{2}, []float32{0, 0}},
				tensor{"b.weight", safetensors.F32, []int{3}, []float32{0, 0, 0}})
		}, errs.KindValue, "b.weight"},
		{"listed twice", func(d string) {
			raw := `{"weight_map": {"a.weight": "` + s1 + `", "b.weight": "` + s1 + `", "c.weight": "` + s2 + `", "a.weight": "` + s2 + `"}}`
			require.NoError(t, os.WriteFile(filepath.Join(d, IndexFile), []byte(raw), 0o644))
		}, errs.KindValue, "a.weight twice"},
		{"index names a tensor its shard lacks", func(d string) {
			index(d, map[string]string{"a.weight": s1, "b.weight": s1, "c.weight": s2, "d.weight": s2})
		}, errs.KindValue, "d.weight"},
		{"shard holds an unlisted tensor", func(d string) {
			index(d, map[string]string{"a.weight": s1, "c.weight": s2})
		}, errs.KindValue, "b.weight"},
		{"index in the wrong shard", func(d string) {
			index(d, map[string]string{"a.weight": s1, "b.weight": s2, "c.weight": s2})
		}, errs.KindValue, "b.weight"},
		{"no config", func(d string) {
			require.NoError(t, os.Remove(filepath.Join(d, ConfigFile)))
		}, errs.KindFileNotFound, ConfigFile},
		{"bad index", func(d string) {
			require.NoError(t, os.WriteFile(filepath.Join(d, IndexFile), []byte(`[1]`), 0o644))
		}, errs.KindValue, IndexFile},
		{"no weights", func(d string) {
			require.NoError(t, os.Remove(filepath.Join(d, IndexFile)))
		}, errs.KindFileNotFound, SingleFile},
		{"broken shard", func(d string) {
			require.NoError(t, os.WriteFile(filepath.Join(d, s2), []byte("garbage"), 0o644))
		}, errs.KindValue, s2},
	}
	for _, c := range cases {
		t.Run(c.name, func(t *testing.T) {
			dir := shardedFolder(t)
			c.mutate(dir)
			f, err := Open(dir)
			if f != nil {
				f.Close()
			}
			require.Error(t, err)
			assert.Equal(t, c.kind, errs.KindOf(err), err.Error())
			assert.Contains(t, err.Error(), c.want)
		})
	}
}

// A snapshot of the Hugging Face cache is a folder of symlinks into the
// repository's blobs: those resolve inside the repository and are accepted.
func TestOpenHubCacheSnapshot(t *testing.T) {
	repo := t.TempDir()
	blobs, snap := filepath.Join(repo, "blobs"), filepath.Join(repo, "snapshots", "abc123")
	require.NoError(t, os.MkdirAll(blobs, 0o755))
	require.NoError(t, os.MkdirAll(snap, 0o755))
	writeJSON(t, filepath.Join(blobs, "cfg"), map[string]any{"model_type": "gpt2"})
	writeShard(t, filepath.Join(blobs, "w"), tensor{"w", safetensors.F32, []int{1}, []float32{1}})
	require.NoError(t, os.Symlink("../../blobs/cfg", filepath.Join(snap, ConfigFile)))
	require.NoError(t, os.Symlink("../../blobs/w", filepath.Join(snap, SingleFile)))
	f, err := Open(snap)
	require.NoError(t, err)
	defer f.Close()
	assert.Equal(t, []string{"w"}, f.Names())
}

func TestOtherFilesRefusesLinksOut(t *testing.T) {
	dir := shardedFolder(t)
	outside := filepath.Join(t.TempDir(), "secret.txt")
	require.NoError(t, os.WriteFile(outside, []byte("x"), 0o644))
	require.NoError(t, os.Symlink(outside, filepath.Join(dir, "tokenizer_config.json")))
	f, err := Open(dir)
	require.NoError(t, err)
	defer f.Close()
	_, err = f.OtherFiles()
	require.Error(t, err)
	assert.Contains(t, err.Error(), "tokenizer_config.json")
}

func TestSplit(t *testing.T) {
	sizes := map[string]int64{"a": 4, "b": 4, "c": 10, "d": 1}
	cases := []struct {
		max  int64
		want []Shard
	}{
		{100, []Shard{{Name: SingleFile, Tensors: []string{"a", "b", "c", "d"}}}},
		{8, []Shard{
			{Name: "model-00001-of-00003.safetensors", Tensors: []string{"a", "b"}},
			{Name: "model-00002-of-00003.safetensors", Tensors: []string{"c"}},
			{Name: "model-00003-of-00003.safetensors", Tensors: []string{"d"}},
		}},
	}
	for _, c := range cases {
		assert.Equal(t, c.want, Split([]string{"a", "b", "c", "d"}, sizes, c.max))
	}
}

// An output folder appears on Commit with its shards, index and copied
// files; Abort leaves nothing; an existing output is refused without
// overwrite.
func TestOutput(t *testing.T) {
	src, err := Open(shardedFolder(t))
	require.NoError(t, err)
	defer src.Close()
	parent := t.TempDir()
	dir := filepath.Join(parent, "out")
	o, err := Create(dir, false)
	require.NoError(t, err)
	w, err := o.CreateShard(SingleFile, []safetensors.OutTensor{{Name: "w", DType: safetensors.F32, Shape: []int{1}},
		{Name: "copied", DType: safetensors.BF16, Shape: []int{2, 3}}})
	require.NoError(t, err)
	require.NoError(t, w.WriteTensor("w", safetensors.Encode(safetensors.F32, []float32{3})))
	_, err = src.CopyTensor(w, "copied", "a.weight", nil)
	require.NoError(t, err)
	_, err = src.CopyTensor(w, "copied", "c.weight", nil)
	require.Error(t, err, "sizes differ")
	require.NoError(t, w.Close())
	require.NoError(t, o.CopyFiles(src))
	_, err = o.Path("../escape")
	require.Error(t, err)
	assert.NoDirExists(t, dir, "nothing visible before Commit")
	require.NoError(t, o.Commit())
	for _, name := range []string{SingleFile, ConfigFile, "tokenizer.json"} {
		assert.FileExists(t, filepath.Join(dir, name))
	}
	st, err := safetensors.Open(filepath.Join(dir, SingleFile))
	require.NoError(t, err)
	copied, err := st.ReadFloat32("copied")
	require.NoError(t, err)
	assert.Equal(t, []float32{1, 2, 3, 4, 5, 6}, copied)
	st.Close()
	entries, _ := os.ReadDir(parent)
	assert.Len(t, entries, 1, "no temporary folder left")

	_, err = Create(dir, false)
	assert.Equal(t, errs.KindFileExists, errs.KindOf(err))
	o, err = Create(dir, true)
	require.NoError(t, err)
	o.Abort()
	assert.FileExists(t, filepath.Join(dir, SingleFile), "abort leaves the old output")
	entries, _ = os.ReadDir(parent)
	assert.Len(t, entries, 1)

	notModel := t.TempDir()
	require.NoError(t, os.WriteFile(filepath.Join(notModel, "data.txt"), nil, 0o644))
	_, err = Create(notModel, true)
	assert.Equal(t, errs.KindFileExists, errs.KindOf(err))
}
