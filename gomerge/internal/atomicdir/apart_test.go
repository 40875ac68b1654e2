package atomicdir

import (
	"errors"
	"path/filepath"
	"strings"
	"testing"

	"gomerge/gomerge/errs"
)

func TestCheckApart(t *testing.T) {
	root := t.TempDir()
	a, b := filepath.Join(root, "a"), filepath.Join(root, "b")
	for _, tc := range []struct {
		name, out, msg string
	}{
		{"apart", filepath.Join(root, "out"), ""},
		{"same", a + "/", "is also an input adapter"},
		{"inside an input", filepath.Join(b, "out"), "lie one inside the other"},
		{"holding an input", root, "lie one inside the other"},
	} {
		err := CheckApart(tc.out, []string{a, "", b}, "input adapter")
		if tc.msg == "" {
			if err != nil {
				t.Errorf("%s: %v", tc.name, err)
			}
			continue
		}
		var e *errs.Error
		if err == nil || !strings.Contains(err.Error(), tc.msg) || !errors.As(err, &e) || e.Kind != errs.KindValue {
			t.Errorf("%s: got %v, want a ValueError with %q", tc.name, err, tc.msg)
		}
	}
}
