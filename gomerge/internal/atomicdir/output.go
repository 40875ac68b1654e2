package atomicdir

import (
	"encoding/json"
	"os"
	"path/filepath"

	"gomerge/gomerge/errs"
)

// Output is an output folder being written, the one protocol of every
// output of the engine (adapters, model folders). Every file goes to a
// temporary folder beside the output directory; Commit renames it into
// place, Abort (or a killed process, whose folder the next writer in that
// parent removes) leaves nothing behind, and an existing output is replaced
// only when overwrite was asked, and only if it holds what kind names, in
// one rename.
type Output struct {
	Dir       string
	overwrite bool
	pending   *Pending
}

// Create checks dir (Check) and starts writing it.
func Create(dir string, overwrite bool, kind Kind) (*Output, error) {
	if err := Check(dir, overwrite, kind); err != nil {
		return nil, err
	}
	p, err := Begin(dir, kind)
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
	return WriteFileSync(path, data)
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
