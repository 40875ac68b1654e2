package modelfolder

import (
	"bytes"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/safetensors"
)

// File names of a Hugging Face model folder.
const (
	ConfigFile = "config.json"
	SingleFile = "model.safetensors"
	IndexFile  = "model.safetensors.index.json"
)

// Shard is one safetensors file of a folder and the tensors it holds
// (sorted).
type Shard struct {
	Name    string   `json:"name"`
	Tensors []string `json:"tensors"`
}

// TensorInfo describes one tensor of a folder.
type TensorInfo struct {
	DType    safetensors.DType // "" for dtypes other than F32, BF16 and F16
	RawDType string            // as written in the file (F32, BF16, I64, BOOL, ...)
	Shape    []int
	Shard    string // the shard's file name
	Bytes    int64
}

// Folder is an open, validated model folder. Its methods may be called
// from several goroutines at once.
type Folder struct {
	Dir     string
	root    string // where its files may resolve to (see root)
	config  map[string]any
	shards  []Shard
	files   map[string]*safetensors.File // by shard name
	info    map[string]TensorInfo
	names   []string
	indexed bool
}

// Open opens and validates a model folder: config.json, then
// model.safetensors.index.json and its shards, or model.safetensors. Every
// shard header is read and checked against the index; tensor data is read
// on demand.
func Open(dir string) (*Folder, error) {
	st, err := os.Stat(dir)
	if err != nil {
		if errors.Is(err, fs.ErrNotExist) {
			return nil, errs.New(errs.KindFileNotFound, "model folder %s does not exist", dir)
		}
		return nil, errs.IO(dir, err)
	}
	if !st.IsDir() {
		return nil, errs.Value("%s is not a directory; pass a Hugging Face model folder (with %s and %s or %s)", dir, ConfigFile, SingleFile, IndexFile)
	}
	real, err := filepath.EvalSymlinks(dir)
	if err != nil {
		return nil, errs.IO(dir, err)
	}
	if real, err = filepath.Abs(real); err != nil {
		return nil, errs.IO(dir, err)
	}
	f := &Folder{Dir: dir, root: root(real), files: map[string]*safetensors.File{}, info: map[string]TensorInfo{}}
	if err := f.readConfig(); err != nil {
		return nil, err
	}
	if err := f.openWeights(); err != nil {
		f.Close()
		return nil, err
	}
	return f, nil
}

func (f *Folder) readConfig() error {
	path, err := f.resolveInside(ConfigFile, "the folder")
	if err != nil {
		if errs.KindOf(err) == errs.KindFileNotFound {
			return errs.New(errs.KindFileNotFound, "%s: no %s (is this a Hugging Face model folder?)", f.Dir, ConfigFile)
		}
		return err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return errs.IO(path, err)
	}
	if f.config, err = decodeObject(data); err != nil {
		return errs.Value("%s: not a JSON object: %v", path, err)
	}
	return nil
}

// decodeObject decodes a JSON object keeping numbers as written (json.Number).
func decodeObject(data []byte) (map[string]any, error) {
	dec := json.NewDecoder(bytes.NewReader(data))
	dec.UseNumber()
	var m map[string]any
	if err := dec.Decode(&m); err != nil {
		return nil, err
	}
	if m == nil {
		return nil, fmt.Errorf("null")
	}
	return m, nil
}

func (f *Folder) openWeights() error {
	if _, err := os.Lstat(filepath.Join(f.Dir, IndexFile)); err == nil {
		f.indexed = true
		return f.openIndexed()
	}
	if _, err := os.Lstat(filepath.Join(f.Dir, SingleFile)); err != nil {
		hint := ""
		if _, err := os.Stat(filepath.Join(f.Dir, "pytorch_model.bin")); err == nil {
			hint = " (only pytorch_model.bin found: re-save the model with safe_serialization=True)"
		}
		return errs.New(errs.KindFileNotFound, "%s: no %s or %s%s", f.Dir, SingleFile, IndexFile, hint)
	}
	return f.openShards(map[string][]string{SingleFile: nil}, nil)
}

// openIndexed reads the index and opens the shards it names.
func (f *Folder) openIndexed() error {
	path, err := f.resolveInside(IndexFile, "the folder")
	if err != nil {
		return err
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return errs.IO(path, err)
	}
	weightMap, err := parseIndex(data)
	if err != nil {
		return errs.Value("%s: %v", path, err)
	}
	if len(weightMap) == 0 {
		return errs.Value("%s: weight_map is empty", path)
	}
	byShard := map[string][]string{}
	for name, shard := range weightMap {
		byShard[shard] = append(byShard[shard], name)
	}
	return f.openShards(byShard, weightMap)
}

// parseIndex reads an index's weight_map, refusing a tensor listed twice
// (encoding/json would keep the last entry silently).
func parseIndex(data []byte) (map[string]string, error) {
	var idx struct {
		WeightMap json.RawMessage `json:"weight_map"`
	}
	if err := json.Unmarshal(data, &idx); err != nil {
		return nil, fmt.Errorf("not a valid index: %v", err)
	}
	if idx.WeightMap == nil {
		return nil, fmt.Errorf("no weight_map")
	}
	dec := json.NewDecoder(bytes.NewReader(idx.WeightMap))
	if tok, err := dec.Token(); err != nil || tok != json.Delim('{') {
		return nil, fmt.Errorf("weight_map is not an object")
	}
	out := map[string]string{}
	for dec.More() {
		kt, err := dec.Token()
		if err != nil {
			return nil, fmt.Errorf("weight_map: %v", err)
		}
		name := kt.(string)
		var shard string
		if err := dec.Decode(&shard); err != nil {
			return nil, fmt.Errorf("weight_map: tensor %s: the shard must be a file name: %v", name, err)
		}
		if prev, ok := out[name]; ok {
			return nil, fmt.Errorf("weight_map lists tensor %s twice (in %s and in %s)", name, prev, shard)
		}
		out[name] = shard
	}
	return out, nil
}

// openShards opens every shard (checking its name stays inside the folder)
// and checks its header against the index: each listed tensor is in its
// shard, and no tensor is in two shards or missing from the index.
func (f *Folder) openShards(byShard map[string][]string, weightMap map[string]string) error {
	names := make([]string, 0, len(byShard))
	for s := range byShard {
		names = append(names, s)
	}
	sort.Strings(names)
	what := "the folder"
	if weightMap != nil {
		what = IndexFile
	}
	for _, s := range names {
		path, err := f.resolveInside(s, what)
		if err != nil {
			return err
		}
		file, err := safetensors.Open(path)
		if err != nil {
			return err
		}
		file.AllowNonFinite = true // a base is copied as it is
		f.files[s] = file
		shard := Shard{Name: s}
		for name, e := range file.Entries {
			if prev, ok := f.info[name]; ok {
				return errs.Value("%s: tensor %s is in two shards, %s and %s", f.Dir, name, prev.Shard, s)
			}
			if weightMap != nil && weightMap[name] != s {
				if listed, ok := weightMap[name]; ok {
					return errs.Value("%s: tensor %s is in shard %s, but %s lists it in %s", f.Dir, name, s, IndexFile, listed)
				}
				return errs.Value("%s: shard %s holds tensor %s, which %s does not list", f.Dir, s, name, IndexFile)
			}
			f.info[name] = TensorInfo{DType: e.DType, RawDType: e.RawDType, Shape: e.Shape, Shard: s, Bytes: e.Length}
			shard.Tensors = append(shard.Tensors, name)
		}
		for _, name := range byShard[s] {
			if _, ok := file.Entries[name]; !ok {
				return errs.Value("%s: %s lists tensor %s in shard %s, which does not hold it", f.Dir, IndexFile, name, s)
			}
		}
		sort.Strings(shard.Tensors)
		f.shards = append(f.shards, shard)
	}
	for name := range f.info {
		f.names = append(f.names, name)
	}
	sort.Strings(f.names)
	return nil
}

// Close closes the shard files.
func (f *Folder) Close() error {
	var first error
	for _, file := range f.files {
		if err := file.Close(); err != nil && first == nil {
			first = err
		}
	}
	return first
}

// Config is config.json as decoded (numbers as json.Number); callers must
// not change it (CloneConfig gives a copy to change).
func (f *Folder) Config() map[string]any { return f.config }

// CloneConfig returns a copy of config.json's top level, to be changed and
// written to an output folder.
func (f *Folder) CloneConfig() map[string]any {
	out := make(map[string]any, len(f.config))
	for k, v := range f.config {
		out[k] = v
	}
	return out
}

// Names lists the state-dict names of every tensor, sorted.
func (f *Folder) Names() []string { return f.names }

// Shards lists the folder's safetensors files in name order, each with
// its tensors (one model.safetensors for an unsharded folder).
func (f *Folder) Shards() []Shard { return f.shards }

// Sharded tells whether the weights are listed by model.safetensors.index.json.
func (f *Folder) Sharded() bool { return f.indexed }

// Info describes tensor name; false when the folder has no such tensor.
func (f *Folder) Info(name string) (TensorInfo, bool) {
	t, ok := f.info[name]
	return t, ok
}

// ReadFloat32 reads tensor name converted to float32, and its shape. A
// tensor of another dtype (integers, booleans) is a ValueError.
func (f *Folder) ReadFloat32(name string) ([]float32, []int, error) {
	t, ok := f.info[name]
	if !ok {
		return nil, nil, errs.Value("%s: the model has no tensor %s", f.Dir, name)
	}
	if t.DType == "" {
		return nil, nil, errs.Value("%s: tensor %s has dtype %s; only F32, BF16 and F16 tensors can be read as floats", f.Dir, name, t.RawDType)
	}
	x, err := f.files[t.Shard].ReadFloat32(name)
	return x, t.Shape, err
}

// ReadFloat32Into is ReadFloat32 into out (of the tensor's element count).
func (f *Folder) ReadFloat32Into(out []float32, name string) ([]float32, error) {
	t, ok := f.info[name]
	if !ok {
		return nil, errs.Value("%s: the model has no tensor %s", f.Dir, name)
	}
	if t.DType == "" {
		return nil, errs.Value("%s: tensor %s has dtype %s; only F32, BF16 and F16 tensors can be read as floats", f.Dir, name, t.RawDType)
	}
	return f.files[t.Shard].ReadFloat32Into(out, name)
}

// ReadRaw reads the stored bytes of tensor name, whatever its dtype, into
// dst (grown when too small).
func (f *Folder) ReadRaw(name string, dst []byte) ([]byte, error) {
	t, ok := f.info[name]
	if !ok {
		return nil, errs.Value("%s: the model has no tensor %s", f.Dir, name)
	}
	return f.files[t.Shard].ReadRaw(name, dst)
}

// weightExts are the extensions of weight files, never copied to an output
// folder: its weights are the ones written there.
var weightExts = []string{".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx"}

// isWeightFile tells whether a file (path relative to the folder) holds
// weights or indexes them.
func isWeightFile(rel string) bool {
	base := strings.ToLower(filepath.Base(rel))
	for _, ext := range weightExts {
		if strings.HasSuffix(base, ext) || strings.HasSuffix(base, ext+".index.json") {
			return true
		}
	}
	return false
}

// OtherFiles lists the files that travel with the model (every file but
// the weights, their indexes, README.md and hidden entries), as paths
// relative to the folder, sorted. A symlink resolving outside the folder
// is an error.
func (f *Folder) OtherFiles() ([]string, error) {
	var out []string
	err := filepath.WalkDir(f.Dir, func(path string, d fs.DirEntry, err error) error {
		if err != nil {
			return errs.IO(path, err)
		}
		rel, _ := filepath.Rel(f.Dir, path)
		if rel == "." {
			return nil
		}
		if strings.HasPrefix(d.Name(), ".") {
			if d.IsDir() {
				return filepath.SkipDir
			}
			return nil
		}
		if d.IsDir() || isWeightFile(rel) || rel == "README.md" {
			return nil
		}
		real, err := f.resolveInside(rel, "the folder")
		if err != nil {
			return err
		}
		if st, err := os.Stat(real); err != nil || !st.Mode().IsRegular() {
			return nil // a dangling link or a special file: nothing to copy
		}
		out = append(out, rel)
		return nil
	})
	sort.Strings(out)
	return out, err
}

// CopyTensor writes tensor src of the folder, as stored, as tensor name of
// w (a shard of an output folder), inside the kernel where it can (see
// safetensors.Writer.CopyTensor); buf is a reusable buffer for the
// fallback, returned grown.
func (f *Folder) CopyTensor(w *safetensors.Writer, name, src string, buf []byte) ([]byte, error) {
	t, ok := f.info[src]
	if !ok {
		return buf, errs.Value("%s: the model has no tensor %s", f.Dir, src)
	}
	return w.CopyTensor(name, f.files[t.Shard], src, buf)
}
