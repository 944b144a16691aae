package fusefs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

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

// TestBackingKeptWhileKernelHoldsInode: an inode's passthrough backing
// registration outlives its opens: opening a file again costs no
// BACKING_OPEN, and the registration goes when the kernel forgets the
// inode (here: the file is removed). A successor takes over a registration
// kept so (its record) and reuses and closes it itself; after a copy-up
// on an overlay, the upper file replaces the lower one as the backing.
func TestBackingKeptWhileKernelHoldsInode(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt, srv := mountUnmanaged(t, base, l, Options{})
	if !srv.Passthrough() {
		t.Skip("no passthrough here")
	}
	ops := func(s *Server) (uint64, uint64) { return s.sess.backingOpens.Load(), s.sess.backingCloses.Load() }
	readAll := func(name, want string) {
		t.Helper()
		for range 3 {
			if got, err := os.ReadFile(filepath.Join(mnt, name)); err != nil || string(got) != want {
				t.Fatalf("read %s: %q, %v", name, got, err)
			}
		}
	}
	waitCloses := func(s *Server, want uint64) {
		t.Helper()
		for deadline := time.Now().Add(5 * time.Second); ; time.Sleep(time.Millisecond) {
			if _, c := ops(s); c == want {
				return
			} else if time.Now().After(deadline) {
				t.Fatalf("%d BACKING_CLOSEs, want %d", c, want)
			}
		}
	}
	for _, n := range []string{"x", "y"} {
		if err := os.WriteFile(filepath.Join(mnt, n), []byte(n+n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	o0, c0 := ops(srv)
	readAll("x", "xx")
	readAll("y", "yy")
	if o, c := ops(srv); o-o0 != 0 || c-c0 != 0 {
		// The writes' registrations were kept: the reads made none.
		t.Errorf("6 opens of 2 files registered %d and unregistered %d backing files, want 0 and 0", o-o0, c-c0)
	}
	if err := os.Remove(filepath.Join(mnt, "x")); err != nil {
		t.Fatal(err)
	}
	waitCloses(srv, c0+1) // FORGET of x

	srv2 := stopAndAdopt(t, mnt, srv, l)
	defer func() {
		if err := srv2.Unmount(); err != nil {
			t.Error(err)
		}
	}()
	readAll("y", "yy")
	if o, c := ops(srv2); o != 0 || c != 0 {
		t.Errorf("the successor registered %d and unregistered %d backing files for y, want 0 and 0", o, c)
	}
	if err := os.Remove(filepath.Join(mnt, "y")); err != nil {
		t.Fatal(err)
	}
	waitCloses(srv2, 1)
}

// TestBackingFollowsCopyUp: a lower file's kept registration is replaced
// by its upper copy's at the first write open after the copy-up, and
// reads see what was written.
func TestBackingFollowsCopyUp(t *testing.T) {
	lower := t.TempDir()
	if err := os.WriteFile(filepath.Join(lower, "f"), []byte("lower"), 0o644); err != nil {
		t.Fatal(err)
	}
	mnt, srv := testOverlayMountServer(t, lower, Options{})
	if !srv.Passthrough() {
		t.Skip("no passthrough here")
	}
	p := filepath.Join(mnt, "f")
	if got, err := os.ReadFile(p); err != nil || string(got) != "lower" {
		t.Fatalf("read: %q, %v", got, err)
	}
	// The read's RELEASE is asynchronous. A write open that overtakes it
	// finds the lower file still read through passthrough and is served
	// here instead (the kernel stacks an inode on one backing file),
	// registering nothing; the write open after it, once that RELEASE is
	// through, is the one this test is about.
	appendOnce := func(s string) (opens, closes uint64) {
		o0, c0 := srv.sess.backingOpens.Load(), srv.sess.backingCloses.Load()
		r0 := srv.RequestCounts()["RELEASE"]
		f, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString(s); err != nil {
			t.Fatal(err)
		}
		f.Close()
		waitFor(t, "the writer's RELEASE", func() bool { return srv.RequestCounts()["RELEASE"] > r0 })
		waitServed(t, srv)
		return srv.sess.backingOpens.Load() - o0, srv.sess.backingCloses.Load() - c0
	}
	want := "lower+upper"
	o, c := appendOnce("+upper")
	if o == 0 && c == 0 {
		want += "+again"
		o, c = appendOnce("+again")
	}
	if o != 1 || c != 1 {
		t.Errorf("the write open after a read registered %d and unregistered %d backing files, want 1 and 1", o, c)
	}
	for range 2 {
		if got, err := os.ReadFile(p); err != nil || string(got) != want {
			t.Errorf("read after the write: %q, %v, want %q", got, err, want)
		}
	}
	if got, _ := os.ReadFile(filepath.Join(lower, "f")); string(got) != "lower" {
		t.Errorf("the lower file became %q", got)
	}
}
