package overlay

import (
	"syscall"
	"testing"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// TestExporter: LookupInode finds a node in the table only (lower,
// copied up or upper), and adds a reference; LookupParent names a
// directory's parent, and the root's is the root.
func TestExporter(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	lookup := func(parent uint64, name string) vfs.Entry {
		t.Helper()
		e, err := fs.Lookup(parent, name)
		if err != nil {
			t.Fatalf("lookup %s: %v", name, err)
		}
		return e
	}
	a := lookup(vfs.RootIno, "a")
	sub := lookup(a.Ino(), "sub")
	g := lookup(sub.Ino(), "g")

	for _, e := range []vfs.Entry{a, sub, g} {
		got, err := fs.LookupInode(e.Ino())
		if err != nil || got.Ino() != e.Ino() {
			t.Errorf("LookupInode(%d) = %d, %v", e.Ino(), got.Ino(), err)
		}
		fs.Forget(e.Ino(), 1)
	}
	p, err := fs.LookupParent(sub.Ino())
	if err != nil || p.Ino() != a.Ino() {
		t.Errorf("LookupParent(sub) = %d, %v; want %d", p.Ino(), err, a.Ino())
	}
	fs.Forget(a.Ino(), 1)
	p, err = fs.LookupParent(vfs.RootIno)
	if err != nil || p.Ino() != vfs.RootIno {
		t.Errorf("LookupParent(root) = %d, %v", p.Ino(), err)
	}
	_, err = fs.LookupParent(g.Ino())
	if err != syscall.ENOTDIR {
		t.Errorf("LookupParent of a file: %v, want ENOTDIR", err)
	}

	// A copied-up file keeps its number; a forgotten one is not found by
	// its number alone.
	if err := fs.SetXattr(g.Ino(), "user.x", []byte("1"), 0); err != nil {
		t.Fatal(err)
	}
	got, err := fs.LookupInode(g.Ino())
	if err != nil || got.Ino() != g.Ino() {
		t.Errorf("LookupInode(copied-up g) = %d, %v", got.Ino(), err)
	}
	fs.Forget(g.Ino(), 2)
	if _, err := fs.LookupInode(g.Ino()); err != syscall.ESTALE {
		t.Errorf("LookupInode of a forgotten node: %v, want ESTALE", err)
	}
	fs.Forget(sub.Ino(), 1)
	fs.Forget(a.Ino(), 1)
}

// TestForgetKeepsParents: a Forget of more references than a caller holds
// (as a server that took over a connection gets, for the lookups of its
// predecessor) drops the callers' references only: a directory stays while
// a node in it is held, and LookupParent still finds it.
func TestForgetKeepsParents(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	a, err := fs.Lookup(vfs.RootIno, "a")
	if err != nil {
		t.Fatal(err)
	}
	sub, err := fs.Lookup(a.Ino(), "sub")
	if err != nil {
		t.Fatal(err)
	}
	fs.Forget(a.Ino(), 5)
	if err := fs.CheckInvariants(); err != nil {
		t.Fatalf("after forgetting a: %v", err)
	}
	p, err := fs.LookupParent(sub.Ino())
	if err != nil || p.Ino() != a.Ino() {
		t.Fatalf("LookupParent(sub) = %d, %v; want %d", p.Ino(), err, a.Ino())
	}
	fs.Forget(a.Ino(), 5)
	fs.Forget(sub.Ino(), 5)
	if _, err := fs.LookupInode(a.Ino()); err != syscall.ESTALE {
		t.Errorf("LookupInode(a) once nothing holds it: %v, want ESTALE", err)
	}
}
