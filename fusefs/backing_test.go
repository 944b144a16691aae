package fusefs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// decoyFS offers, for every write open, a Direct file whose descriptor is
// a different file (the decoy), as an overlay does when an inode's backing
// moves from its lower file to its upper copy.
type decoyFS struct {
	vfs.FS
	decoyFd int
}

type decoyFile struct {
	vfs.File
	fd int
}

func (d decoyFile) Fd() int      { return d.fd }
func (d decoyFile) Direct() bool { return true }

func (d decoyFS) Open(ino uint64, flags int, o vfs.OpenOptions) (vfs.File, error) {
	f, err := d.FS.Open(ino, flags, o)
	if err != nil || flags&unix.O_ACCMODE == unix.O_RDONLY {
		return f, err
	}
	return decoyFile{File: f, fd: d.decoyFd}, nil
}

// TestBackingIsNeverSharedAcrossFiles: while an inode's passthrough backing
// is one file, an open that offers another file fails with ETXTBSY (the
// kernel allows one backing per inode), and the other file is never
// written; once the backing is gone the open works.
func TestBackingIsNeverSharedAcrossFiles(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	decoy, err := os.Create(filepath.Join(base, "decoy"))
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { decoy.Close() }) // after the unmount
	mnt, _ := mountTest(t, base, decoyFS{FS: l, decoyFd: int(decoy.Fd())}, Options{})

	p := filepath.Join(mnt, "x")
	if err := os.WriteFile(p, nil, 0o644); err != nil { // a write open, itself a decoy
		t.Fatal(err)
	}
	r, err := os.Open(p) // registers x's own file as the backing
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	want := []byte("to the volume, not the decoy")
	if err := os.WriteFile(p, want, 0o644); !errors.Is(err, syscall.ETXTBSY) {
		t.Errorf("write open beside a passthrough reader: %v, want ETXTBSY", err)
	}
	r.Close()
	if got, _ := os.ReadFile(decoy.Name()); len(got) != 0 {
		t.Errorf("the decoy was written: %q", got)
	}
}

// TestOneBackingPerInode: what the kernel's one-backing rule means for
// users. A grow-sealed file's writer (which memfs must serve) cannot open
// while a passthrough reader has the file open: ETXTBSY. A set-ID file can
// be written beside readers: an unprivileged writer's open clears the bits,
// so it needs no daemon.
func TestOneBackingPerInode(t *testing.T) {
	mnt, _, _ := testMount(t, 16<<20, Options{})
	g := filepath.Join(mnt, "grow")
	os.WriteFile(g, []byte("data"), 0o666)
	if err := unix.Setxattr(g, memfs.SealsXattr, []byte("grow"), 0); err != nil {
		t.Fatal(err)
	}
	r, err := os.Open(g)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.OpenFile(g, os.O_WRONLY, 0); !errors.Is(err, syscall.ETXTBSY) {
		t.Errorf("grow-sealed writer beside a reader: %v, want ETXTBSY", err)
	}
	r.Close()
	// Right after the reader's close (its RELEASE is asynchronous).
	w, err := os.OpenFile(g, os.O_WRONLY, 0)
	if err != nil {
		t.Fatalf("grow-sealed writer after the reader closed: %v", err)
	}
	w.Close()

	s := filepath.Join(mnt, "setid")
	os.WriteFile(s, []byte("#!/bin/sh\n"), 0o666)
	os.Chmod(s, 0o6777)
	r, err = os.Open(s)
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if got := asUser(t, "write", s); got != 0 {
		t.Errorf("unprivileged write to a set-ID file beside a reader: %v", got)
	}
	if fi, _ := os.Stat(s); fi.Mode()&(os.ModeSetuid|os.ModeSetgid) != 0 {
		t.Errorf("set-ID bits kept: %v", fi.Mode())
	}
}
