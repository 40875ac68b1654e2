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

// Output is a model folder being written, by the engine's one output
// protocol (atomicdir.Output: a temporary folder renamed into place), with
// the shards, the index and the files that travel with the model.
type Output struct{ *atomicdir.Output }

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
	o, err := atomicdir.Create(dir, overwrite, folderKind)
	if err != nil {
		return nil, err
	}
	return &Output{o}, nil
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

// IsTemp tells whether a folder name is one of gomerge's temporary folders.
func IsTemp(name string) bool { return strings.HasPrefix(name, atomicdir.TmpPrefix) }
