// Package atomicdir writes an output directory atomically: everything goes
// to a temporary folder beside it (in the same parent, so on the same file
// system), which Commit renames into place and Abort removes. A failed,
// cancelled or killed write leaves no partial output and, with overwrite,
// the old directory intact. Merged adapters and fused model folders are
// both written this way. CheckApart is the one rule, for every command,
// that keeps an output folder apart from the inputs.
package atomicdir

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"gomerge/gomerge/errs"
)

// TmpPrefix starts the names of the temporary folders created beside the
// output directory: .gomerge-tmp-<pid>-<output name>-<random>.
const TmpPrefix = ".gomerge-tmp-"

// Kind says what an output directory holds, so that overwrite replaces
// only a directory of that kind: Marker is a file every such directory
// has (adapter_config.json, config.json), What names the kind in errors.
type Kind struct {
	Marker string
	What   string
}

// Check refuses an existing output directory unless overwrite is set, and
// with overwrite refuses anything that is not a directory of this kind
// (holding kind.Marker) or an empty directory, so that a mistyped path
// cannot replace unrelated data.
func Check(dir string, overwrite bool, kind Kind) error {
	st, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return errs.IO(dir, err)
	}
	if !overwrite {
		return errs.New(errs.KindFileExists, "output_dir %s already exists; pass overwrite=True to replace it", dir)
	}
	if !st.IsDir() {
		return errs.New(errs.KindFileExists, "output_dir %s exists and is not a directory; refusing to replace it", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return errs.IO(dir, err)
	}
	if len(entries) == 0 {
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, kind.Marker)); err != nil {
		return errs.New(errs.KindFileExists, "output_dir %s is not empty and holds no %s; refusing to overwrite a directory that is not %s",
			dir, kind.Marker, kind.What)
	}
	return nil
}

// Pending is an output directory being written.
type Pending struct {
	Dir, Parent, Tmp string
	kind             Kind
}

// Begin creates the temporary folder for dir (and dir's parent if needed),
// after removing the temporary folders of dead processes there. Whether
// dir may be written is checked by the caller up front (Check) and again
// by Commit, when it matters.
func Begin(dir string, kind Kind) (*Pending, error) {
	dir = filepath.Clean(dir)
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, errs.IO(parent, err)
	}
	CleanStale(parent)
	tmp, err := os.MkdirTemp(parent, fmt.Sprintf("%s%d-%s-", TmpPrefix, os.Getpid(), filepath.Base(dir)))
	if err != nil {
		return nil, errs.IO(parent, err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		os.RemoveAll(tmp)
		return nil, errs.IO(tmp, err)
	}
	return &Pending{Dir: dir, Parent: parent, Tmp: tmp, kind: kind}, nil
}

// Path is where a file of the output goes while it is pending: name is
// reduced to its base name, so that nothing is written outside the folder.
func (p *Pending) Path(name string) string { return filepath.Join(p.Tmp, filepath.Base(name)) }

// Abort removes everything written so far.
func (p *Pending) Abort() { os.RemoveAll(p.Tmp) }

// Commit renames the finished folder into place (replacing an existing
// output directory, checked again to be replaceable).
func (p *Pending) Commit(overwrite bool) error {
	SyncDir(p.Tmp)
	if _, statErr := os.Lstat(p.Dir); statErr == nil {
		if err := Check(p.Dir, overwrite, p.kind); err != nil { // it may have appeared meanwhile
			return err
		}
		// Swap the two directories in one step, so that output_dir always holds a complete output, old or new;
		// the old one, now under the temporary name, is then removed.
		if err := unix.Renameat2(unix.AT_FDCWD, p.Tmp, unix.AT_FDCWD, p.Dir, unix.RENAME_EXCHANGE); err == nil {
			_ = os.RemoveAll(p.Tmp)
			SyncDir(p.Parent)
			return nil
		}
		// No RENAME_EXCHANGE (an old kernel or another file system): move the old one aside first.
		old := filepath.Join(p.Parent, fmt.Sprintf("%s%d-old-%s-%s", TmpPrefix, os.Getpid(), filepath.Base(p.Dir), randomSuffix()))
		if err := os.Rename(p.Dir, old); err != nil {
			return errs.IO(p.Dir, err)
		}
		if err := os.Rename(p.Tmp, p.Dir); err != nil {
			_ = os.Rename(old, p.Dir)
			return errs.IO(p.Dir, err)
		}
		_ = os.RemoveAll(old)
	} else if err := os.Rename(p.Tmp, p.Dir); err != nil {
		return errs.IO(p.Dir, err)
	}
	SyncDir(p.Parent)
	return nil
}

// CleanStale removes temporary folders left in dir by writers whose process
// no longer exists (killed before they could clean up). Folders of live
// processes, this one included, are left alone.
func CleanStale(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, TmpPrefix) {
			continue
		}
		pidText, _, ok := strings.Cut(strings.TrimPrefix(name, TmpPrefix), "-")
		pid, err := strconv.Atoi(pidText)
		if !ok || err != nil || pid <= 0 || processAlive(pid) {
			continue
		}
		_ = os.RemoveAll(filepath.Join(dir, name))
	}
}

// processAlive tells whether a process with this id exists.
func processAlive(pid int) bool {
	err := syscall.Kill(pid, 0)
	return err == nil || errors.Is(err, syscall.EPERM)
}

// WriteFileSync writes data to path and syncs it.
func WriteFileSync(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return errs.IO(path, err)
	}
	_, err = f.Write(data)
	return errs.SyncClose(f, path, err)
}

// SyncDir syncs a directory's entries (best effort).
func SyncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		_ = f.Sync()
		_ = f.Close()
	}
}

func randomSuffix() string {
	b := make([]byte, 6)
	_, _ = rand.Read(b)
	return hex.EncodeToString(b)
}
