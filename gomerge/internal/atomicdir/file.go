package atomicdir

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"

	"gomerge/gomerge/errs"
)

// FileKind says what an output file is, so that overwrite replaces only a
// file of that kind: Is tells it by its content (a magic number), What
// names the kind in errors.
type FileKind struct {
	Is   func(path string) bool
	What string
}

// CheckFile refuses an existing output file unless overwrite is set, and
// with overwrite anything that is not a regular file of this kind, so that
// a mistyped path cannot replace unrelated data.
func CheckFile(path string, overwrite bool, kind FileKind) error {
	st, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return errs.IO(path, err)
	}
	if !overwrite {
		return errs.New(errs.KindFileExists, "output %s already exists; pass overwrite=True to replace it", path)
	}
	if !st.Mode().IsRegular() || !kind.Is(path) {
		return errs.New(errs.KindFileExists, "output %s exists and is not %s; refusing to replace it", path, kind.What)
	}
	return nil
}

// File is one output file being written, by the protocol of Output: it is
// written inside a temporary folder beside it (which the next writer there
// removes if this process dies), and Commit renames it into place in one
// step, replacing an old file only with overwrite and only of its kind.
type File struct {
	Path      string
	Tmp       string // where the file is written until Commit
	overwrite bool
	kind      FileKind
	pending   *Pending
}

// CreateFile checks path (CheckFile) and starts writing it.
func CreateFile(path string, overwrite bool, kind FileKind) (*File, error) {
	if err := CheckFile(path, overwrite, kind); err != nil {
		return nil, err
	}
	p, err := Begin(path, Kind{What: kind.What})
	if err != nil {
		return nil, err
	}
	path = filepath.Clean(path)
	return &File{Path: path, Tmp: p.Path(path), overwrite: overwrite, kind: kind, pending: p}, nil
}

// Commit renames the finished file into place (the file was synced by its
// writer) and removes the temporary folder.
func (f *File) Commit() error {
	defer f.pending.Abort()
	if err := CheckFile(f.Path, f.overwrite, f.kind); err != nil { // it may have appeared meanwhile
		return err
	}
	if err := os.Rename(f.Tmp, f.Path); err != nil {
		return errs.IO(f.Path, err)
	}
	SyncDir(f.pending.Parent)
	return nil
}

// Abort removes what was written; an existing output file is left as it was.
func (f *File) Abort() { f.pending.Abort() }
