package modelfolder

import (
	"encoding/json"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"

	"gomerge/gomerge/errs"
	"gomerge/gomerge/internal/atomicdir"
	"gomerge/gomerge/safetensors"
)

// folderKind is what an output model folder holds: overwrite replaces only
// a directory with a config.json (or an empty one).
var folderKind = atomicdir.Kind{Marker: ConfigFile, What: "a model folder"}

// Output is a model folder being written. Every file goes to a temporary
// folder beside the output directory; Commit renames it into place, Abort
// (or a killed process, whose folder the next writer in that parent
// removes) leaves nothing behind, and an existing output is replaced only
// when overwrite was asked, in one rename.
type Output struct {
	Dir       string
	overwrite bool
	pending   *atomicdir.Pending
}

// CheckOutput refuses an output directory that exists (unless overwrite is
// set) or is not a model folder; Create checks it too, this lets callers
// check before any work.
func CheckOutput(dir string, overwrite bool) error {
	return atomicdir.Check(dir, overwrite, folderKind)
}

// Create starts writing the model folder dir.
func Create(dir string, overwrite bool) (*Output, error) {
	if dir == "" {
		return nil, errs.Value("output_dir: a directory to write the model to is required")
	}
	if err := CheckOutput(dir, overwrite); err != nil {
		return nil, err
	}
	p, err := atomicdir.Begin(dir, folderKind)
	if err != nil {
		return nil, err
	}
	return &Output{Dir: filepath.Clean(dir), overwrite: overwrite, pending: p}, nil
}

// Path is where the output's file rel (a path relative to the folder, no
// "..") is written while pending; its parent folders are created.
func (o *Output) Path(rel string) (string, error) {
	if !filepath.IsLocal(rel) {
		return "", errs.Value("%s: refusing to write %q, which is outside the output folder", o.Dir, rel)
	}
	path := filepath.Join(o.pending.Tmp, rel)
	if err := os.MkdirAll(filepath.Dir(path), 0o755); err != nil {
		return "", errs.IO(filepath.Dir(path), err)
	}
	return path, nil
}

// CreateShard creates the shard file name with a header for the given
// tensors (metadata {"format": "pt"}, as transformers writes); the tensors
// are then written in any order, from any goroutine.
func (o *Output) CreateShard(name string, tensors []safetensors.OutTensor) (*safetensors.Writer, error) {
	path, err := o.Path(name)
	if err != nil {
		return nil, err
	}
	return safetensors.Create(path, tensors, map[string]string{"format": "pt"})
}

// WriteIndex writes model.safetensors.index.json for the shards: the
// weight_map of every tensor and metadata.total_size, the sum of the
// tensors' bytes.
func (o *Output) WriteIndex(shards []Shard, totalSize int64) error {
	weightMap := map[string]string{}
	for _, s := range shards {
		for _, t := range s.Tensors {
			weightMap[t] = s.Name
		}
	}
	idx := map[string]any{"metadata": map[string]any{"total_size": totalSize}, "weight_map": weightMap}
	data, err := json.MarshalIndent(idx, "", "  ")
	if err != nil {
		return errs.New(errs.KindInternal, "index: %v", err)
	}
	return o.WriteFile(IndexFile, append(data, '\n'))
}

// WriteJSON writes a JSON file (config.json and the like), indented.
func (o *Output) WriteJSON(rel string, v any) error {
	data, err := json.MarshalIndent(v, "", "  ")
	if err != nil {
		return errs.Value("%s: %v", rel, err)
	}
	return o.WriteFile(rel, append(data, '\n'))
}

// WriteFile writes a file of the output.
func (o *Output) WriteFile(rel string, data []byte) error {
	path, err := o.Path(rel)
	if err != nil {
		return err
	}
	return atomicdir.WriteFileSync(path, data)
}

// CopyFiles copies src's files that travel with the model (OtherFiles)
// into the output, except those in skip (written by the caller, such as a
// changed config.json).
func (o *Output) CopyFiles(src *Folder, skip ...string) error {
	files, err := src.OtherFiles()
	if err != nil {
		return err
	}
	sort.Strings(skip)
	for _, rel := range files {
		if i := sort.SearchStrings(skip, rel); i < len(skip) && skip[i] == rel {
			continue
		}
		if err := o.copyFile(filepath.Join(src.Dir, rel), rel); err != nil {
			return err
		}
	}
	return nil
}

func (o *Output) copyFile(from, rel string) error {
	in, err := os.Open(from)
	if err != nil {
		return errs.IO(from, err)
	}
	defer in.Close()
	path, err := o.Path(rel)
	if err != nil {
		return err
	}
	out, err := os.Create(path)
	if err != nil {
		return errs.IO(path, err)
	}
	_, err = io.Copy(out, in)
	return errs.SyncClose(out, path, err)
}

// Commit syncs and renames the finished folder into place.
func (o *Output) Commit() error {
	if err := o.pending.Commit(o.overwrite); err != nil {
		o.Abort()
		return err
	}
	return nil
}

// Abort removes everything written so far; the output directory, if it
// existed, is left as it was.
func (o *Output) Abort() { o.pending.Abort() }

// TempDir is the temporary folder the output is written to (for tests).
func (o *Output) TempDir() string { return o.pending.Tmp }

// IsTemp tells whether a folder name is one of gomerge's temporary folders.
func IsTemp(name string) bool { return strings.HasPrefix(name, atomicdir.TmpPrefix) }
