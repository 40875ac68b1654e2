package gomerge

import (
	"crypto/rand"
	"encoding/hex"
	"errors"
	"io/fs"
	"os"
	"path/filepath"
)

// tmpPrefix starts the names of the temporary folders that WriteAdapterDir
// creates beside the output directory.
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

// WriteAdapterDir writes a PEFT adapter directory atomically: everything
// goes to a temporary folder beside dir, which is then renamed into place.
// A failure leaves no partial output and, with overwrite, the old directory
// intact.
func WriteAdapterDir(dir string, overwrite bool, config []byte, tensors map[string]RawTensor, extra map[string][]byte) (err error) {
	if err := checkOutputDir(dir, overwrite); err != nil {
		return err
	}
	dir = filepath.Clean(dir)
	parent := filepath.Dir(dir)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		return ioErr(parent, err)
	}
	tmp, err := os.MkdirTemp(parent, tmpPrefix+filepath.Base(dir)+"-")
	if err != nil {
		return ioErr(parent, err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	if err := os.Chmod(tmp, 0o755); err != nil {
		return ioErr(tmp, err)
	}
	if err := WriteSafetensors(filepath.Join(tmp, WeightsFile), tensors, map[string]string{"format": "pt"}); err != nil {
		return err
	}
	if err := writeFileSync(filepath.Join(tmp, ConfigFile), config); err != nil {
		return err
	}
	for name, data := range extra {
		if err := writeFileSync(filepath.Join(tmp, filepath.Base(name)), data); err != nil {
			return err
		}
	}
	if _, statErr := os.Lstat(dir); statErr == nil {
		// overwrite: move the old directory aside, put the new one in place
		old := filepath.Join(parent, tmpPrefix+"old-"+filepath.Base(dir)+"-"+randomSuffix())
		if err := os.Rename(dir, old); err != nil {
			return ioErr(dir, err)
		}
		if err := os.Rename(tmp, dir); err != nil {
			_ = os.Rename(old, dir)
			return ioErr(dir, err)
		}
		_ = os.RemoveAll(old)
	} else if err := os.Rename(tmp, dir); err != nil {
		return ioErr(dir, err)
	}
	syncDir(parent)
	return nil
}

func writeFileSync(path string, data []byte) error {
	f, err := os.Create(path)
	if err != nil {
		return ioErr(path, err)
	}
	_, err = f.Write(data)
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return ioErr(path, err)
	}
	return nil
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
