package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"

	"golang.org/x/sys/unix"
)

// setSysctl writes value to a kernel parameter file for the test and
// puts the old value back when the test ends.
func setSysctl(t testing.TB, path, value string) {
	t.Helper()
	old, err := os.ReadFile(path)
	if err != nil {
		t.Skipf("the kernel has no %s: %v", path, err)
	}
	if err := os.WriteFile(path, []byte(value), 0); err != nil {
		t.Skipf("cannot write %s: %v", path, err)
	}
	t.Cleanup(func() {
		if err := os.WriteFile(path, old, 0); err != nil {
			t.Errorf("restoring %s: %v", path, err)
		}
	})
}

// requireRing switches FUSE over io_uring on for the test (and back off
// after it), or skips the test where the kernel or the container cannot
// serve FUSE over io_uring.
func requireRing(t testing.TB) {
	t.Helper()
	requireFUSE(t)
	r, err := newURing(2)
	if err != nil {
		t.Skipf("io_uring refused here: %v", err)
	}
	r.close()
	setSysctl(t, enableURingParam, "Y")
}

// devFuseRequests counts the requests of opcodes ops that reach srv
// through /dev/fuse.
func devFuseRequests(srv *Server, ops ...uint32) *atomic.Int64 {
	var n atomic.Int64
	hook := func(in []byte) (bool, bool) {
		op := uint32(in[4]) | uint32(in[5])<<8
		for _, o := range ops {
			if op == o {
				n.Add(1)
			}
		}
		return false, false
	}
	srv.sess.testHook.Store(&hook)
	return &n
}

const (
	opGetattr = 3
	opStatfs  = 17
)

// TestRingServes: a mount on the ring answers requests there, not on
// /dev/fuse, and says so.
func TestRingServes(t *testing.T) {
	requireRing(t)
	mnt, _, srv := testMount(t, 16<<20, Options{Transport: TransportIOUring})
	if got := srv.Transport(); got != TransportIOUring {
		t.Fatalf("Transport() = %q, want %q", got, TransportIOUring)
	}
	dev := devFuseRequests(srv, opGetattr, opStatfs)
	f := filepath.Join(mnt, "f")
	if err := os.WriteFile(f, []byte("hello"), 0o644); err != nil {
		t.Fatal(err)
	}
	var sfs unix.Statfs_t
	var stx unix.Statx_t
	for range 100 {
		if err := unix.Statfs(mnt, &sfs); err != nil {
			t.Fatal(err)
		}
		if err := unix.Statx(unix.AT_FDCWD, f, unix.AT_STATX_FORCE_SYNC, unix.STATX_BASIC_STATS, &stx); err != nil {
			t.Fatal(err)
		}
	}
	if b, err := os.ReadFile(f); err != nil || string(b) != "hello" {
		t.Fatalf("read back %q, %v", b, err)
	}
	if n := dev.Load(); n != 0 {
		t.Errorf("%d STATFS/GETATTR requests came through /dev/fuse, want 0 (all on the ring)", n)
	}
}

func TestRingPosixPassthrough(t *testing.T) {
	requireRing(t)
	runPosix(t, Options{Transport: TransportIOUring})
}

func TestRingPosixDaemonIO(t *testing.T) {
	requireRing(t)
	runPosix(t, Options{Transport: TransportIOUring, DisablePassthrough: true})
}

func TestRingSeals(t *testing.T) {
	requireRing(t)
	testSeals(t, Options{Transport: TransportIOUring})
}

// TestRingAdoptRefused: a connection whose INIT chose the ring is not
// adopted, even from a session put together by hand.
func TestRingAdoptRefused(t *testing.T) {
	requireRing(t)
	mnt, l, srv := testMount(t, 16<<20, Options{Transport: TransportIOUring})
	dev, err := dupFile(srv.sess.devFd, "/dev/fuse")
	if err != nil {
		t.Fatal(err)
	}
	handles, err := srv.raw.handles.dup()
	if err != nil {
		dev.Close()
		t.Fatal(err)
	}
	sess := Session{Dev: dev, Handles: handles, Init: srv.sess.init}
	if s2, err := Adopt(mnt, sess, l, Options{}, false); !errors.Is(err, ErrRingHandover) {
		if err == nil {
			s2.Stop()
		}
		t.Fatalf("Adopt of a ring connection: %v, want ErrRingHandover", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o644); err != nil {
		t.Errorf("serving after a refused Adopt: %v", err)
	}
}

// TestRingFallback: where io_uring is refused (here by
// kernel.io_uring_disabled=2, as a seccomp filter or an old kernel would),
// auto serves over /dev/fuse and io-uring fails the mount.
func TestRingFallback(t *testing.T) {
	requireRing(t)
	setSysctl(t, "/proc/sys/kernel/io_uring_disabled", "2")
	mnt, _, srv := testMount(t, 16<<20, Options{NoHandover: true})
	if got := srv.Transport(); got != TransportDevFuse {
		t.Errorf("auto with io_uring disabled: Transport() = %q, want %q", got, TransportDevFuse)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	base, l := newTestLayer(t, 16<<20)
	dir := filepath.Join(base, "mnt")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if srv, err := Mount(dir, l, Options{Transport: TransportIOUring}); err == nil {
		srv.Unmount()
		t.Fatal("io-uring with io_uring disabled mounted")
	}
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil || st.Type == fuseSuperMagic {
		t.Errorf("the failed mount left something on %s: type %#x, %v", dir, st.Type, err)
	}
}

// fuseSuperMagic is FUSE's f_type.
const fuseSuperMagic = 0x65735546

// TestRingAutoSwitchesParamOn: with enable_uring N, auto switches it on
// where it may, and serves on the ring.
func TestRingAutoSwitchesParamOn(t *testing.T) {
	requireRing(t)
	setSysctl(t, enableURingParam, "N")
	_, _, srv := testMount(t, 16<<20, Options{NoHandover: true})
	if got := srv.Transport(); got != TransportIOUring {
		t.Errorf("auto, enable_uring N but writable: Transport() = %q, want %q", got, TransportIOUring)
	}
	if b, _ := os.ReadFile(enableURingParam); len(b) == 0 || b[0] != 'Y' {
		t.Errorf("enable_uring = %q after an auto mount, want Y", b)
	}
}

// TestRingNotWithHandover: auto keeps a mount that may change server (the
// default) on /dev/fuse, and leaves enable_uring alone; a mount on the
// ring refuses Session and Stop and goes on serving.
func TestRingNotWithHandover(t *testing.T) {
	requireRing(t)
	setSysctl(t, enableURingParam, "N")
	_, _, srv := testMount(t, 16<<20, Options{})
	if got := srv.Transport(); got != TransportDevFuse {
		t.Errorf("auto, may change server: Transport() = %q, want %q", got, TransportDevFuse)
	}
	if b, _ := os.ReadFile(enableURingParam); len(b) == 0 || b[0] != 'N' {
		t.Errorf("enable_uring = %q after an auto mount that may change server, want N", b)
	}
	os.WriteFile(enableURingParam, []byte("Y"), 0)
	mnt, _, srv := testMount(t, 16<<20, Options{Transport: TransportIOUring})
	if _, err := srv.Session(); !errors.Is(err, ErrRingHandover) {
		t.Errorf("Session() on the ring: %v, want ErrRingHandover", err)
	}
	if _, err := srv.Stop(); !errors.Is(err, ErrRingHandover) {
		t.Errorf("Stop() on the ring: %v, want ErrRingHandover", err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("x"), 0o644); err != nil {
		t.Errorf("serving after a refused Stop: %v", err)
	}
}

// TestParseTransport: the names, and the zero value as auto.
func TestParseTransport(t *testing.T) {
	for in, want := range map[string]Transport{"": TransportAuto, "auto": TransportAuto, "io-uring": TransportIOUring, "dev-fuse": TransportDevFuse} {
		if got, err := ParseTransport(in); err != nil || got != want {
			t.Errorf("ParseTransport(%q) = %q, %v; want %q", in, got, err, want)
		}
	}
	if _, err := ParseTransport("uring"); err == nil {
		t.Error(`ParseTransport("uring") succeeded`)
	}
}

// TestRingConcurrent: many callers at once on both CPUs' queues, with the
// daemon serving reads and writes (no passthrough), so that every byte
// passes through the entries' payload buffers: a reply committed for the
// wrong request, or a buffer reused too early, shows as a wrong size or
// wrong bytes.
func TestRingConcurrent(t *testing.T) {
	requireRing(t)
	mnt, l, srv := testMount(t, 256<<20, Options{Transport: TransportIOUring, DisablePassthrough: true})
	if got := srv.Transport(); got != TransportIOUring {
		t.Fatalf("Transport() = %q, want %q", got, TransportIOUring)
	}
	const workers, rounds = 16, 60
	var wg sync.WaitGroup
	errs := make(chan error, workers)
	for w := range workers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			dir := filepath.Join(mnt, fmt.Sprint("w", w))
			if err := os.Mkdir(dir, 0o755); err != nil {
				errs <- err
				return
			}
			for i := range rounds {
				name := filepath.Join(dir, fmt.Sprint(i%5))
				data := bytes.Repeat([]byte{byte(w), byte(i)}, 1+(w*rounds+i)*97%150000)
				if err := os.WriteFile(name, data, 0o644); err != nil {
					errs <- err
					return
				}
				var st unix.Stat_t
				if err := unix.Stat(name, &st); err != nil || st.Size != int64(len(data)) {
					errs <- fmt.Errorf("%s: size %d, %v; want %d", name, st.Size, err, len(data))
					return
				}
				if got, err := os.ReadFile(name); err != nil || !bytes.Equal(got, data) {
					errs <- fmt.Errorf("%s: read back %d bytes (%v), want %d of %02x%02x", name, len(got), err, len(data), w, i)
					return
				}
				if i%3 == 0 {
					if err := os.Remove(name); err != nil {
						errs <- err
						return
					}
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := l.CheckInvariants(); err != nil {
		t.Error(err)
	}
}
