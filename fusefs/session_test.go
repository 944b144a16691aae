package fusefs

import (
	"fmt"
	"os"
	"runtime"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// TestReadersGrowAndShrink: a burst of parallel requests adds readers; a
// run of serial ones then lets the surplus end, and no request is left
// unread on the way (the device is edge-triggered: a reader that ended
// with a request queued, whose wake-up another had taken, stranded it).
func TestReadersGrowAndShrink(t *testing.T) {
	mnt, _, srv := testMount(t, 16<<20, Options{})
	var st unix.Stat_t
	if err := unix.Stat(mnt, &st); err != nil {
		t.Fatal(err)
	}
	// A stranded request would hang the test and its cleanup: abort the
	// connection instead, which fails the request.
	watchdog := time.AfterFunc(20*time.Second, func() {
		abort := fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", unix.Minor(st.Dev))
		os.WriteFile(abort, []byte("1"), 0)
	})
	defer watchdog.Stop()

	f := mnt + "/f"
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	var sfs unix.Statfs_t
	for round := range 5 {
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				var sfs unix.Statfs_t
				for range 200 {
					if err := unix.Statfs(mnt, &sfs); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		grown := srv.sess.readers.Load()
		// Serial, but a close's RELEASE is sent in the background, so it
		// often arrives together with the next request.
		for i := range 300 {
			fd, err := unix.Open(f, unix.O_RDONLY, 0)
			if err == nil {
				unix.Close(fd)
				err = unix.Statfs(mnt, &sfs)
			}
			if err != nil {
				t.Fatalf("round %d, serial request %d: %v", round, i, err)
			}
		}
		// One at a time, each request lets a surplus reader end (readers
		// started but not yet scheduled count too, for a while).
		for end := time.Now().Add(5 * time.Second); srv.sess.readers.Load() > 3 && time.Now().Before(end); {
			if err := unix.Statfs(mnt, &sfs); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond)
		}
		if n := srv.sess.readers.Load(); n > 3 {
			t.Errorf("round %d: %d readers after serial requests (%d after the burst), want at most 3", round, n, grown)
		}
	}
}

// TestInterruptDeclined: the first INTERRUPT of a connection is answered
// ENOSYS while the request it interrupts is still being served, and the
// kernel sends none after it. A caller's signal then costs no request,
// and the interrupted request is answered as any other.
func TestInterruptDeclined(t *testing.T) {
	mnt, _, srv := testMount(t, 16<<20, Options{Transport: TransportDevFuse})
	f := mnt + "/f"
	if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
		t.Fatal(err)
	}
	var interrupts atomic.Int64
	var armed atomic.Bool
	// entered hands the test a channel to close to let the held GETATTR go.
	entered := make(chan chan struct{})
	hook := func(in []byte) (bool, bool) {
		switch uint32(in[4]) | uint32(in[5])<<8 {
		case opInterrupt:
			interrupts.Add(1)
		case opGetattr:
			if armed.CompareAndSwap(true, false) {
				release := make(chan struct{})
				entered <- release
				<-release
			}
		}
		return false, false
	}
	srv.sess.testHook.Store(&hook)

	// interrupted makes one GETATTR of f, signalled (SIGURG, which the Go
	// runtime handles and restarts after) while the server holds it.
	interrupted := func(waitForInterrupt bool) {
		t.Helper()
		armed.Store(true)
		tids := make(chan int)
		done := make(chan error, 1)
		go func() {
			runtime.LockOSThread()
			defer runtime.UnlockOSThread()
			tids <- unix.Gettid()
			var stx unix.Statx_t
			done <- unix.Statx(unix.AT_FDCWD, f, unix.AT_STATX_FORCE_SYNC, unix.STATX_BASIC_STATS, &stx)
		}()
		tid := <-tids
		release := <-entered
		defer func() {
			if release != nil {
				close(release)
			}
		}()
		if err := unix.Tgkill(unix.Getpid(), tid, unix.SIGURG); err != nil {
			t.Fatal(err)
		}
		if waitForInterrupt {
			waitFor(t, "the INTERRUPT's ENOSYS", srv.sess.interruptsOff.Load)
		}
		close(release)
		release = nil
		if err := <-done; err != nil {
			t.Errorf("the interrupted statx: %v, want it answered", err)
		}
	}
	interrupted(true)
	// The INTERRUPT's ENOSYS was taken while the GETATTR was held: the
	// kernel sends no INTERRUPT for the next.
	interrupted(false)
	// An INTERRUPT goes ahead of every request queued after it: once a
	// later request is answered, any INTERRUPT of the one before is read.
	var sfs unix.Statfs_t
	if err := unix.Statfs(mnt, &sfs); err != nil {
		t.Fatal(err)
	}
	if n := interrupts.Load(); n != 1 {
		t.Errorf("%d INTERRUPTs for two signalled requests, want 1 (none after the first's ENOSYS)", n)
	}
}
