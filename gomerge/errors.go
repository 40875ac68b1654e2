package gomerge

import (
	"os"

	"gomerge/gomerge/errs"
)

// The typed errors of package errs, under the names the bindings use.

// ErrKind classifies an error so that the Python layer can raise the matching
// exception class. The string values are Python exception names.
type ErrKind = errs.ErrKind

// Error is an error with an ErrKind. Its message names the file, tensor or
// argument at fault.
type Error = errs.Error

// Error kinds, named after the Python exceptions they become.
const (
	KindValue        = errs.KindValue
	KindType         = errs.KindType
	KindFileNotFound = errs.KindFileNotFound
	KindFileExists   = errs.KindFileExists
	KindOS           = errs.KindOS
	KindCancelled    = errs.KindCancelled
	KindInternal     = errs.KindInternal
)

// KindOf returns the ErrKind of err, KindInternal for errors without one.
func KindOf(err error) ErrKind { return errs.KindOf(err) }

// ErrCancelled is returned by a merge that was cancelled.
var ErrCancelled = &Error{Kind: KindCancelled, Msg: "merge cancelled"}

func newErr(kind ErrKind, format string, args ...any) error { return errs.New(kind, format, args...) }

func valueErr(format string, args ...any) error { return errs.Value(format, args...) }

// ioErr turns an os error on path into a typed Error.
func ioErr(path string, err error) error { return errs.IO(path, err) }

// syncClose syncs and closes f after a write that returned err, and returns
// the first error as an Error naming path.
func syncClose(f *os.File, path string, err error) error { return errs.SyncClose(f, path, err) }
