package gomerge

import (
	"errors"
	"fmt"
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

func newErr(kind ErrKind, format string, args ...any) error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

func valueErr(format string, args ...any) error { return newErr(KindValue, format, args...) }

// KindOf returns the ErrKind of err, KindInternal for errors without one.
func KindOf(err error) ErrKind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}

// ErrCancelled is returned by a merge that was cancelled.
var ErrCancelled = &Error{Kind: KindCancelled, Msg: "merge cancelled"}
