package errs

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	"github.com/stretchr/testify/assert"
	"github.com/stretchr/testify/require"
)

func TestKindOf(t *testing.T) {
	for _, tc := range []struct {
		name string
		err  error
		want ErrKind
	}{
		{"value", Value("bad %d", 1), KindValue},
		{"wrapped", fmt.Errorf("context: %w", New(KindType, "x")), KindType},
		{"untyped", errors.New("x"), KindInternal},
		{"not found", IO("p", fs.ErrNotExist), KindFileNotFound},
		{"exists", IO("p", fs.ErrExist), KindFileExists},
		{"other os error", IO("p", fs.ErrPermission), KindOS},
	} {
		t.Run(tc.name, func(t *testing.T) {
			assert.Equal(t, tc.want, KindOf(tc.err))
		})
	}
	assert.Equal(t, "bad 1", Value("bad %d", 1).Error())
	assert.Equal(t, "p: no such file or directory", IO("p", fs.ErrNotExist).Error())
}

func TestSyncClose(t *testing.T) {
	path := filepath.Join(t.TempDir(), "f")
	f, err := os.Create(path)
	require.NoError(t, err)
	require.NoError(t, SyncClose(f, path, nil))
	err = SyncClose(f, path, nil) // closed already
	require.Error(t, err)
	assert.Equal(t, KindOS, KindOf(err))
	assert.Contains(t, err.Error(), path)
}
