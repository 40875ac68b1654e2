// Package errs holds gomerge's typed errors: an Error carries an ErrKind,
// named after the Python exception that the Python layer raises for it.
// Every package of the engine returns them.
package errs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
)

// ErrKind classifies an error so that the Python layer can raise the matching
// exception class. The string values are Python exception names.
type ErrKind string

// Error kinds, named after the Python exceptions they become.
const (
	KindValue        ErrKind = "ValueError"
	KindType         ErrKind = "TypeError"
	KindFileNotFound ErrKind = "FileNotFoundError"
	KindFileExists   ErrKind = "FileExistsError"
	KindOS           ErrKind = "OSError"
	KindCancelled    ErrKind = "KeyboardInterrupt"
	KindInternal     ErrKind = "RuntimeError"
)

// Error is an error with an ErrKind. Its message names the file, tensor or
// argument at fault.
type Error struct {
	Kind ErrKind
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

// New returns an Error of the given kind with a formatted message.
func New(kind ErrKind, format string, args ...any) error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

// Value returns a ValueError (KindValue) with a formatted message.
func Value(format string, args ...any) error { return New(KindValue, format, args...) }

// KindOf returns the ErrKind of err, KindInternal for errors without one.
func KindOf(err error) ErrKind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}

// IO turns an os error on path into a typed Error: FileNotFoundError,
// FileExistsError or OSError.
func IO(path string, err error) error {
	switch {
	case errors.Is(err, fs.ErrNotExist):
		return New(KindFileNotFound, "%s: no such file or directory", path)
	case errors.Is(err, fs.ErrExist):
		return New(KindFileExists, "%s: already exists", path)
	}
	return New(KindOS, "%s: %v", path, err)
}

// SyncClose syncs and closes f after a write that returned err, and returns
// the first error as an Error naming path.
func SyncClose(f *os.File, path string, err error) error {
	if err == nil {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return IO(path, err)
	}
	return nil
}

// ErrCancelled is returned by a merge, fuse or extraction that was
// cancelled.
var ErrCancelled = &Error{Kind: KindCancelled, Msg: "merge cancelled"}
