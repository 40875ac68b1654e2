package modelfolder

import (
	"os"
	"path/filepath"
	"strings"

	"gomerge/gomerge/errs"
)

// root is where the files of a folder may live once symlinks are resolved:
// the folder itself or, for a snapshot of the Hugging Face cache
// (<repo>/snapshots/<revision>, whose files are symlinks to <repo>/blobs),
// the repository's cache folder.
func root(realDir string) string {
	if filepath.Base(filepath.Dir(realDir)) == "snapshots" {
		return filepath.Dir(filepath.Dir(realDir))
	}
	return realDir
}

// within tells whether path (absolute, symlinks resolved) lies inside dir.
func within(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && filepath.IsLocal(rel)
}

// resolveInside joins a file name taken from the folder (from its index,
// or found in it) to the folder, and checks that it stays inside: a local
// name (no "..", not absolute) whose resolved path, symlinks followed, is
// inside the folder's root. what names the name's origin in errors.
func (f *Folder) resolveInside(name, what string) (string, error) {
	if !filepath.IsLocal(name) || strings.ContainsRune(name, '\\') {
		return "", errs.Value("%s: %s names %q, which is outside the model folder; refusing to read it", f.Dir, what, name)
	}
	path := filepath.Join(f.Dir, name)
	real, err := filepath.EvalSymlinks(path)
	if err != nil {
		if os.IsNotExist(err) {
			return "", errs.New(errs.KindFileNotFound, "%s: %s names %s, which does not exist", f.Dir, what, name)
		}
		return "", errs.IO(path, err)
	}
	if real, err = filepath.Abs(real); err != nil { // a relative folder gives a relative path
		return "", errs.IO(path, err)
	}
	if !within(f.root, real) {
		return "", errs.Value("%s: %s names %s, a symlink to %s outside the model folder; refusing to read it", f.Dir, what, name, real)
	}
	return path, nil
}
