package overlay

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// TestHeld: a node is held while callers hold it (lookups not forgotten,
// open Files), not while only its children keep it in the table.
func TestHeld(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	held := func(what string, ino uint64, want bool) {
		t.Helper()
		if got := fs.Held(ino); got != want {
			t.Errorf("Held %s = %v, want %v", what, got, want)
		}
	}
	held("root", vfs.RootIno, true)
	held("an unknown inode", 1<<40, false)

	a, err := fs.Lookup(vfs.RootIno, "a")
	if err != nil {
		t.Fatal(err)
	}
	f1, err := fs.Lookup(a.Ino(), "f1")
	if err != nil {
		t.Fatal(err)
	}
	held("a looked-up directory", a.Ino(), true)
	held("a looked-up lower file", f1.Ino(), true)
	fs.Forget(a.Ino(), 1)
	held("a forgotten directory with a held child", a.Ino(), false)
	f, err := fs.Open(f1.Ino(), unix.O_RDONLY, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	fs.Forget(f1.Ino(), 1)
	held("an open, forgotten file", f1.Ino(), true)
	f.Release()
	held("a released, forgotten file", f1.Ino(), false)
	held("a directory whose children are all forgotten", a.Ino(), false)
}
