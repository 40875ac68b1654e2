package gomerge

import (
	"errors"
	"fmt"
)

// Kind classifies an error so that the Python layer can raise the matching
// exception class. The string values are Python exception names.
type Kind string

// Error kinds, named after the Python exceptions they become.
const (
	KindValue        Kind = "ValueError"
	KindType         Kind = "TypeError"
	KindFileNotFound Kind = "FileNotFoundError"
	KindFileExists   Kind = "FileExistsError"
	KindOS           Kind = "OSError"
	KindCancelled    Kind = "KeyboardInterrupt"
	KindInternal     Kind = "RuntimeError"
)

// Error is an error with a Kind. Its message names the file, tensor or
// argument at fault.
type Error struct {
	Kind Kind
	Msg  string
}

func (e *Error) Error() string { return e.Msg }

func newErr(kind Kind, format string, args ...any) error {
	return &Error{Kind: kind, Msg: fmt.Sprintf(format, args...)}
}

func valueErr(format string, args ...any) error { return newErr(KindValue, format, args...) }

// KindOf returns the Kind of err, KindInternal for errors without one.
func KindOf(err error) Kind {
	var e *Error
	if errors.As(err, &e) {
		return e.Kind
	}
	return KindInternal
}

// ErrCancelled is returned by a merge that was cancelled.
var ErrCancelled = &Error{Kind: KindCancelled, Msg: "merge cancelled"}
