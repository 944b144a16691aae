package fusefs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// adoptLayer serves the instance of l again, as a successor process does.
func adoptLayer(t *testing.T, l *memfs.Layer) *memfs.Layer {
	t.Helper()
	l2, err := memfs.Open(l.Dir(), memfs.Options{Size: 16 << 20})
	if err != nil {
		t.Fatal(err)
	}
	return l2
}

// stopAndAdopt stops srv, serving l on mnt, and returns the server, with
// default options and l's files, that took its connection over.
func stopAndAdopt(t *testing.T, mnt string, srv *Server, l *memfs.Layer) *Server {
	t.Helper()
	sess, err := srv.Stop()
	if err != nil {
		t.Fatal(err)
	}
	srv2, err := Adopt(mnt, sess, adoptLayer(t, l), Options{}, false)
	if err != nil {
		t.Fatal(err)
	}
	return srv2
}

// waitDone fails unless ch yields within d, and returns what it yields.
func waitDone[T any](t *testing.T, what string, ch <-chan T, d time.Duration) T {
	t.Helper()
	select {
	case v := <-ch:
		return v
	case <-time.After(d):
		t.Fatalf("%s: still waiting after %s", what, d)
		panic("unreachable")
	}
}

// TestStopAndAdopt: a server stops, a successor adopts its session, and
// applications see a pause: a request made meanwhile waits and is served,
// open files and directories go on working, passthrough included, and
// nothing written is lost.
func TestStopAndAdopt(t *testing.T) {
	for _, tc := range []struct {
		name string
		opts Options
	}{{"passthrough", Options{}}, {"daemon-io", Options{DisablePassthrough: true}}} {
		t.Run(tc.name, func(t *testing.T) {
			base, l := newTestLayer(t, 16<<20)
			mnt := filepath.Join(base, "mnt")
			os.Mkdir(mnt, 0o755)
			srv, err := Mount(mnt, l, tc.opts)
			if err != nil {
				t.Fatal(err)
			}
			p := filepath.Join(mnt, "file")
			w, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			if _, err := w.WriteAt([]byte("before"), 0); err != nil {
				t.Fatal(err)
			}
			os.MkdirAll(filepath.Join(mnt, "d", "e"), 0o755)
			for _, n := range []string{"x", "y", "z"} {
				os.WriteFile(filepath.Join(mnt, "d", n), []byte(n), 0o644)
			}
			dh, err := os.Open(filepath.Join(mnt, "d"))
			if err != nil {
				t.Fatal(err)
			}
			sess, err := srv.Stop()
			if err != nil {
				t.Fatal(err)
			}
			// A request made while nobody serves waits in the kernel.
			looked := make(chan error, 1)
			go func() {
				_, err := os.Lstat(filepath.Join(mnt, "d", "e", "new"))
				looked <- err
			}()
			time.Sleep(50 * time.Millisecond)
			select {
			case err := <-looked:
				t.Fatalf("lstat answered with no server: %v", err)
			default:
			}

			l2 := adoptLayer(t, l)
			srv2, err := Adopt(mnt, sess, l2, tc.opts, false)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				// Unmount waits for the connection to end: close first.
				dh.Close()
				w.Close()
				if err := srv2.Unmount(); err != nil {
					t.Error(err)
				}
				// newTestLayer's cleanup unmounts the instance.
			}()
			if err := waitDone(t, "lstat made during the pause", looked, 5*time.Second); !errors.Is(err, os.ErrNotExist) {
				t.Errorf("lstat made during the pause: %v, want ENOENT", err)
			}
			if _, err := w.WriteAt([]byte("+after"), 6); err != nil {
				t.Fatalf("write through a descriptor opened before: %v", err)
			}
			if st, err := w.Stat(); err != nil || st.Size() != 12 {
				t.Errorf("fstat of a descriptor opened before: %v, %v", st, err)
			}
			if err := w.Sync(); err != nil {
				t.Errorf("fsync of a descriptor opened before: %v", err)
			}
			if got, _ := os.ReadFile(p); string(got) != "before+after" {
				t.Errorf("read back %q", got)
			}
			names, err := dh.Readdirnames(-1)
			if err != nil || len(names) != 4 {
				t.Errorf("readdir of a directory opened before: %v, %v", names, err)
			}
			if err := os.Rename(filepath.Join(mnt, "d", "x"), filepath.Join(mnt, "d", "e", "x")); err != nil {
				t.Errorf("rename after adopt: %v", err)
			}
			if err := os.Remove(filepath.Join(mnt, "d", "y")); err != nil {
				t.Errorf("unlink after adopt: %v", err)
			}
			if got, err := os.ReadFile(filepath.Join(mnt, "d", "e", "x")); err != nil || string(got) != "x" {
				t.Errorf("renamed file: %q, %v", got, err)
			}
			if tc.opts.DisablePassthrough == false && !srv2.Passthrough() {
				t.Errorf("the successor serves without passthrough")
			}
		})
	}
}

// TestAdoptResends: requests a dead server read and never answered are
// sent again by the kernel when the successor adopts with resend, and
// those the dead server carried out answer as if it had replied.
func TestAdoptResends(t *testing.T) {
	const opUnlink = 10
	for _, tc := range []struct {
		name    string
		op      uint32
		noReply bool // served, then the reply lost; else never served
		prepare func(mnt string) error
		run     func(mnt string) error
		check   func(mnt string) error
	}{
		{name: "mkdir done", op: opMkdir, noReply: true,
			run: func(mnt string) error { return os.Mkdir(filepath.Join(mnt, "m"), 0o755) },
			check: func(mnt string) error {
				if st, err := os.Stat(filepath.Join(mnt, "m")); err != nil || !st.IsDir() {
					return errors.New("no directory m")
				}
				return nil
			}},
		{name: "unlink done", op: opUnlink, noReply: true,
			prepare: func(mnt string) error { return os.WriteFile(filepath.Join(mnt, "u"), nil, 0o644) },
			run:     func(mnt string) error { return os.Remove(filepath.Join(mnt, "u")) },
			check: func(mnt string) error {
				if _, err := os.Lstat(filepath.Join(mnt, "u")); !errors.Is(err, os.ErrNotExist) {
					return errors.New("u is still there")
				}
				return nil
			}},
		{name: "mkdir not done", op: opMkdir,
			run: func(mnt string) error { return os.Mkdir(filepath.Join(mnt, "m"), 0o755) },
			check: func(mnt string) error {
				_, err := os.Stat(filepath.Join(mnt, "m"))
				return err
			}},
		{name: "statfs not done", op: opStatfs,
			run: func(mnt string) error {
				var st syscall.Statfs_t
				return syscall.Statfs(mnt, &st)
			}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, l := newTestLayer(t, 16<<20)
			mnt, srv := mountUnmanaged(t, base, l, Options{})
			if tc.prepare != nil {
				if err := tc.prepare(mnt); err != nil {
					t.Fatal(err)
				}
			}
			hit := make(chan struct{})
			var armed atomic.Bool
			armed.Store(true)
			hook := func(in []byte) (bool, bool) {
				if binary.LittleEndian.Uint32(in[4:]) == tc.op && armed.CompareAndSwap(true, false) {
					close(hit)
					return !tc.noReply, tc.noReply
				}
				return false, false
			}
			srv.sess.testHook.Store(&hook)
			ran := make(chan error, 1)
			go func() { ran <- tc.run(mnt) }()
			waitDone(t, "the request", hit, 5*time.Second)
			// The server dies: it reads no more, and the request it read
			// has no answer.
			sess, err := srv.Stop()
			if err != nil {
				t.Fatal(err)
			}
			select {
			case err := <-ran:
				t.Fatalf("answered with no server: %v", err)
			case <-time.After(20 * time.Millisecond):
			}
			srv2, err := Adopt(mnt, sess, adoptLayer(t, l), Options{}, true)
			if err != nil {
				t.Fatal(err)
			}
			defer srv2.Unmount()
			if err := waitDone(t, "the resent request", ran, 5*time.Second); err != nil {
				t.Errorf("%s after the resend: %v", tc.name, err)
			}
			if tc.check != nil {
				if err := tc.check(mnt); err != nil {
					t.Error(err)
				}
			}
		})
	}
}

// TestAdoptWithOtherOptions: a successor whose options would negotiate
// otherwise (here a smaller max_write) serves the connection by what it
// was mounted with: 1 MiB writes still work.
func TestAdoptWithOtherOptions(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt := filepath.Join(base, "mnt")
	os.Mkdir(mnt, 0o755)
	srv, err := Mount(mnt, l, Options{DisablePassthrough: true})
	if err != nil {
		t.Fatal(err)
	}
	srv2 := stopAndAdopt(t, mnt, srv, l)
	defer srv2.Unmount()
	big := make([]byte, 1<<20)
	for i := range big {
		big[i] = byte(i)
	}
	p := filepath.Join(mnt, "big")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE|os.O_TRUNC|syscall.O_DIRECT, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if n, err := f.Write(big); err != nil || n != len(big) {
		t.Fatalf("a 1 MiB write: %d, %v", n, err)
	}
	if got, err := os.ReadFile(p); err != nil || !bytes.Equal(got, big) {
		t.Errorf("read back %d bytes, %v", len(got), err)
	}
	if srv2.Passthrough() {
		t.Errorf("passthrough on a connection mounted without it")
	}
}

// TestAdoptFindsFilesWithNoName: files that have no name when the server
// changes (removed while open, made with O_TMPFILE) go on working through
// the descriptors that hold them, on a memory volume and on an overlay
// (including a lower file copied up, then removed). Their handle records
// name their tmpfs inode, which the kernel's passthrough backing file
// keeps alive after the old process lets go of everything (Detach stands
// for its death). Without passthrough nothing keeps such a file, and its
// descriptors fail (EIO; ESTALE for fstat).
func TestAdoptFindsFilesWithNoName(t *testing.T) {
	for _, tc := range []struct {
		name    string
		overlay bool
		opts    Options
	}{
		{"memfs-passthrough", false, Options{}},
		{"overlay-passthrough", true, Options{}},
		{"memfs-daemon-io", false, Options{DisablePassthrough: true}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			base, l := newTestLayer(t, 16<<20)
			lower := ""
			if tc.overlay {
				lower = makeOverlayLower(t)
			}
			// serve returns the tree of the volume over l, as the
			// driver makes it.
			serve := func(l *memfs.Layer) vfs.FS {
				if !tc.overlay {
					return l
				}
				dl, err := overlay.NewDirLower(lower)
				if err != nil {
					t.Fatal(err)
				}
				fs, err := overlay.New(l, dl)
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(func() { fs.Close(); dl.Close() })
				return fs
			}
			mnt := filepath.Join(base, "mnt")
			os.Mkdir(mnt, 0o755)
			srv, err := Mount(mnt, serve(l), tc.opts)
			if err != nil {
				t.Fatal(err)
			}

			type held struct {
				what string
				f    *os.File
				data string
			}
			var files []held
			open := func(what, name string, flags int, data string) {
				f, err := os.OpenFile(filepath.Join(mnt, name), flags, 0o600)
				if err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				t.Cleanup(func() { f.Close() })
				if _, err := f.WriteAt([]byte(data), 0); err != nil {
					t.Fatalf("%s: %v", what, err)
				}
				if name != "" {
					if err := os.Remove(filepath.Join(mnt, name)); err != nil {
						t.Fatalf("%s: %v", what, err)
					}
				}
				files = append(files, held{what, f, data})
			}
			open("removed while open", "removed", os.O_RDWR|os.O_CREATE, "removed")
			if tc.overlay {
				open("lower file copied up, removed", "top", os.O_RDWR, "TOP")
				files[len(files)-1].data = "TOP\n"
			}
			fd, err := unix.Open(mnt, unix.O_TMPFILE|unix.O_RDWR, 0o600)
			if err != nil {
				t.Fatal(err)
			}
			tf := os.NewFile(uintptr(fd), "tmpfile")
			t.Cleanup(func() { tf.Close() })
			if _, err := tf.WriteAt([]byte("tmpfile"), 0); err != nil {
				t.Fatal(err)
			}
			files = append(files, held{"O_TMPFILE", tf, "tmpfile"})

			sess, err := srv.Stop()
			if err != nil {
				t.Fatal(err)
			}
			l.Detach() // the old process's descriptors die with it
			srv2, err := Adopt(mnt, sess, serve(adoptLayer(t, l)), tc.opts, false)
			if err != nil {
				t.Fatal(err)
			}
			defer func() {
				for _, h := range files {
					h.f.Close()
				}
				if err := srv2.Unmount(); err != nil {
					t.Error(err)
				}
			}()

			for _, h := range files {
				_, werr := h.f.WriteAt([]byte("+after"), int64(len(h.data)))
				st, serr := h.f.Stat()
				if tc.opts.DisablePassthrough {
					if !errors.Is(werr, syscall.EIO) || !(errors.Is(serr, syscall.EIO) || errors.Is(serr, syscall.ESTALE)) {
						t.Errorf("%s: write %v, fstat %v; want EIO, and EIO or ESTALE (nothing kept the file)", h.what, werr, serr)
					}
					continue
				}
				want := h.data + "+after"
				if werr != nil || serr != nil || st.Size() != int64(len(want)) {
					t.Errorf("%s: write %v, fstat %v %v; want size %d", h.what, werr, st, serr, len(want))
					continue
				}
				if err := h.f.Sync(); err != nil {
					t.Errorf("%s: fsync: %v", h.what, err)
				}
				buf := make([]byte, 64)
				if n, _ := h.f.ReadAt(buf, 0); string(buf[:n]) != want {
					t.Errorf("%s: read %q, want %q", h.what, buf[:n], want)
				}
				if err := h.f.Truncate(3); err != nil {
					t.Errorf("%s: ftruncate: %v", h.what, err)
				} else if st, err := h.f.Stat(); err != nil || st.Size() != 3 {
					t.Errorf("%s: after ftruncate: %v, %v", h.what, st, err)
				}
			}
			if tc.overlay {
				if _, err := os.Stat(filepath.Join(mnt, "top")); !errors.Is(err, os.ErrNotExist) {
					t.Errorf("the removed lower file: %v, want ENOENT", err)
				}
			}
		})
	}
}
