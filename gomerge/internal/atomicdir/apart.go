package atomicdir

import (
	"path/filepath"

	"gomerge/gomerge/errs"
)

// CheckApart is the one "output is an input" rule of every command: the
// output folder dir may be none of the inputs, nor lie inside one, nor
// hold one, so that writing or replacing it never touches what is read.
// noun names the inputs in the error ("input adapter", "input model
// folder"); empty inputs are skipped.
func CheckApart(dir string, inputs []string, noun string) error {
	out, err := filepath.Abs(dir)
	if err != nil {
		return errs.IO(dir, err)
	}
	for _, in := range inputs {
		if in == "" {
			continue
		}
		abs, err := filepath.Abs(in)
		if err != nil {
			return errs.IO(in, err)
		}
		if abs == out {
			return errs.Value("output_dir: %s is also an %s; choose another directory", dir, noun)
		}
		if inside(out, abs) || inside(abs, out) {
			return errs.Value("output_dir: %s and the input %s lie one inside the other; choose a directory apart from the inputs", dir, in)
		}
	}
	return nil
}

// inside tells whether path lies strictly inside dir (both absolute and clean).
func inside(dir, path string) bool {
	rel, err := filepath.Rel(dir, path)
	return err == nil && rel != "." && filepath.IsLocal(rel)
}
