package memfs

import (
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// TestHeld: an inode is held while a lookup of it is not forgotten or a
// File or Dir of it is open; the root always is, an unknown number never.
func TestHeld(t *testing.T) {
	l := newLayer(t, 1<<20)
	held := func(what string, ino uint64, want bool) {
		t.Helper()
		if got := l.Held(ino); got != want {
			t.Errorf("Held %s = %v, want %v", what, got, want)
		}
	}
	held("root", vfs.RootIno, true)
	held("an unknown inode", 1<<40, false)

	de := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "d", 0o755, vfs.Root))
	d := de.Ino()
	held("a made directory", d, true)
	l.Forget(d, 1)
	held("a forgotten directory", d, false)
	must[vfs.Entry](t)(l.Lookup(vfs.RootIno, "d"))
	dir := must[vfs.Dir](t)(l.OpenDir(d))
	l.Forget(d, 1)
	held("an open, forgotten directory", d, true)
	dir.Close()
	held("a closed, forgotten directory", d, false)

	e, f, err := l.Create(vfs.RootIno, "f", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	l.Forget(e.Ino(), 1)
	held("an open, forgotten file", e.Ino(), true)
	f.Release()
	held("a released, forgotten file", e.Ino(), false)
}
