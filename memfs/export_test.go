package memfs

import (
	"syscall"
	"testing"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// TestExporter: LookupInode finds a registered inode only, with its
// generation, and adds a reference; LookupParent names a directory's
// parent, and the root's is the root.
func TestExporter(t *testing.T) {
	l := newLayer(t, 1<<20)
	d := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "d", 0o755, vfs.Root))
	e := must[vfs.Entry](t)(l.Mkdir(d.Ino(), "e", 0o755, vfs.Root))
	f := must[vfs.Entry](t)(l.Mknod(e.Ino(), "f", 0o644, 0, vfs.Root))

	got := must[vfs.Entry](t)(l.LookupInode(f.Ino()))
	if got.Ino() != f.Ino() || got.Gen != f.Gen || got.Gen == 0 {
		t.Errorf("LookupInode(f) = ino %d gen %d, want %d gen %d", got.Ino(), got.Gen, f.Ino(), f.Gen)
	}
	if n := l.Refs(f.Ino()); n != 2 {
		t.Errorf("refs of f = %d, want 2", n)
	}
	l.Forget(f.Ino(), 2)
	_, err := l.LookupInode(f.Ino())
	wantErr(t, "LookupInode of a forgotten inode", err, syscall.ESTALE)

	p := must[vfs.Entry](t)(l.LookupParent(e.Ino()))
	if p.Ino() != d.Ino() || p.Gen != d.Gen {
		t.Errorf("LookupParent(e) = %d, want %d", p.Ino(), d.Ino())
	}
	if n := l.Refs(d.Ino()); n != 2 {
		t.Errorf("refs of d = %d, want 2", n)
	}
	// d was forgotten: its parent is found by "..".
	l.Forget(d.Ino(), 2)
	p = must[vfs.Entry](t)(l.LookupParent(e.Ino()))
	if p.Ino() != d.Ino() || l.Refs(d.Ino()) != 1 {
		t.Errorf("LookupParent(e) = %d with %d references, want %d with 1", p.Ino(), l.Refs(d.Ino()), d.Ino())
	}
	p = must[vfs.Entry](t)(l.LookupParent(vfs.RootIno))
	if p.Ino() != vfs.RootIno {
		t.Errorf("LookupParent(root) = %d, want the root", p.Ino())
	}
	ff := must[vfs.Entry](t)(l.Lookup(e.Ino(), "f"))
	_, err = l.LookupParent(ff.Ino())
	wantErr(t, "LookupParent of a file", err, syscall.ENOTDIR)
	l.Forget(ff.Ino(), 1)
	l.Forget(e.Ino(), 1)
	l.Forget(d.Ino(), 1)
}
