package gomerge

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
)

// tmpPrefix starts the names of the temporary folders created beside the
// output directory: .gomerge-tmp-<pid>-<output name>-<random>.
const tmpPrefix = ".gomerge-tmp-"

// checkOutputDir refuses an existing output directory unless overwrite is
// set, and with overwrite refuses anything that is not a directory holding
// a PEFT adapter (or an empty directory), so that a mistyped path cannot
// replace unrelated data.
func checkOutputDir(dir string, overwrite bool) error {
	st, err := os.Lstat(dir)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return ioErr(dir, err)
	}
	if !overwrite {
		return newErr(KindFileExists, "output_dir %s already exists; pass overwrite=True to replace it", dir)
	}
	if !st.IsDir() {
		return newErr(KindFileExists, "output_dir %s exists and is not a directory; refusing to replace it", dir)
	}
	entries, err := os.ReadDir(dir)
	if err != nil {
		return ioErr(dir, err)
	}
	if len(entries) == 0 {
		return nil
	}
	if _, err := os.Stat(filepath.Join(dir, ConfigFile)); err != nil {
		return newErr(KindFileExists, "output_dir %s is not empty and holds no %s; refusing to overwrite a directory that is not an adapter", dir, ConfigFile)
	}
	return nil
}

// pendingDir is an output directory being written: everything goes to a
// temporary folder beside it, which commit renames into place and abort
// removes. A failed or interrupted merge leaves no partial output and, with
// overwrite, the old directory intact.
type pendingDir struct {
	dir, parent, tmp string
}

// beginAdapterDir creates the temporary folder for dir. Whether dir may be
// written is checked by the caller up front and again by commit, when it
// matters.
func beginAdapterDir(dir string) (*pendingDir, error) {
	dir = filepath.Clean(dir)
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return nil, ioErr(parent, err)
	}
	cleanStale(parent)
	tmp, err := os.MkdirTemp(parent, fmt.Sprintf("%s%d-%s-", tmpPrefix, os.Getpid(), filepath.Base(dir)))
	if err != nil {
		return nil, ioErr(parent, err)
	}
	if err := os.Chmod(tmp, 0o755); err != nil {
		os.RemoveAll(tmp)
		return nil, ioErr(tmp, err)
	}
	return &pendingDir{dir: dir, parent: parent, tmp: tmp}, nil
}

// path is where a file of the output goes while it is pending.
func (p *pendingDir) path(name string) string { return filepath.Join(p.tmp, filepath.Base(name)) }

// abort removes everything written so far.
func (p *pendingDir) abort() { os.RemoveAll(p.tmp) }

// commit renames the finished folder into place (replacing an existing
// output directory, already checked to be replaceable).
func (p *pendingDir) commit(overwrite bool) error {
	syncDir(p.tmp)
	if _, statErr := os.Lstat(p.dir); statErr == nil {
		if err := checkOutputDir(p.dir, overwrite); err != nil { // it may have appeared meanwhile
			return err
		}
		// Swap the two directories in one step, so that output_dir always holds a complete adapter, old or new;
		// the old one, now under the temporary name, is then removed.
		if err := unix.Renameat2(unix.AT_FDCWD, p.tmp, unix.AT_FDCWD, p.dir, unix.RENAME_EXCHANGE); err == nil {
			_ = os.RemoveAll(p.tmp)
			syncDir(p.parent)
			return nil
		}
		// No RENAME_EXCHANGE (an old kernel or another file system): move the old one aside first.
		old := filepath.Join(p.parent, fmt.Sprintf("%s%d-old-%s-%s", tmpPrefix, os.Getpid(), filepath.Base(p.dir), randomSuffix()))
		if err := os.Rename(p.dir, old); err != nil {
			return ioErr(p.dir, err)
		}
		if err := os.Rename(p.tmp, p.dir); err != nil {
			_ = os.Rename(old, p.dir)
			return ioErr(p.dir, err)
		}
		_ = os.RemoveAll(old)
	} else if err := os.Rename(p.tmp, p.dir); err != nil {
		return ioErr(p.dir, err)
	}
	syncDir(p.parent)
	return nil
}

// cleanStale removes temporary folders left in dir by merges whose process
// no longer exists (killed before they could clean up). Folders of live
// processes, this one included, are left alone.
func cleanStale(dir string) {
	entries, err := os.ReadDir(dir)
	if err != nil {
		return
	}
	for _, e := range entries {
		name := e.Name()
		if !e.IsDir() || !strings.HasPrefix(name, tmpPrefix) {
			continue
		}
		pidText, _, ok := strings.Cut(strings.TrimPrefix(name, tmpPrefix), "-")
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

func writeFileSync(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return ioErr(path, err)
	}
	_, err = f.Write(data)
	return syncClose(f, path, err)
}

func syncDir(dir string) {
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

// writeConfigAndCard writes adapter_config.json (with a rank pattern for
// modules whose rank differs) and, unless turned off, the README.md card.
func writeConfigAndCard(pending *pendingDir, opts Options, res *Result, base *AdapterConfig, targets TargetModules, pattern Patterns) error {
	cfgJSON, err := MergedConfigJSON(base, res.Rank, targets, pattern, append(Patterns(nil), pattern...), nil)
	if err != nil {
		return err
	}
	if err := writeFileSync(pending.path(ConfigFile), cfgJSON); err != nil {
		return err
	}
	if opts.ModelCard != nil && !*opts.ModelCard {
		return nil
	}
	names := opts.SourceNames
	if len(names) != len(opts.Adapters) {
		names = opts.Adapters
	}
	return writeFileSync(pending.path("README.md"), []byte(ModelCard(opts, res, base.BaseModel, names)))
}
