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

	"github.com/csi-memfs/csi-memfs/memfs"
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
			srv, err := Mount(mnt, FromLayer(l), tc.opts)
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
			srv2, err := Adopt(mnt, sess, FromLayer(l2), tc.opts, false)
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
	const (
		opUnlink = 10
		opMkdir  = 9
		opStatfs = 17
	)
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
			mnt := filepath.Join(base, "mnt")
			os.Mkdir(mnt, 0o755)
			srv, err := Mount(mnt, FromLayer(l), Options{})
			if err != nil {
				t.Fatal(err)
			}
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
			srv2, err := Adopt(mnt, sess, FromLayer(adoptLayer(t, l)), Options{}, true)
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
	srv, err := Mount(mnt, FromLayer(l), Options{DisablePassthrough: true})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := srv.Stop()
	if err != nil {
		t.Fatal(err)
	}
	srv2, err := Adopt(mnt, sess, FromLayer(adoptLayer(t, l)), Options{}, false)
	if err != nil {
		t.Fatal(err)
	}
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
