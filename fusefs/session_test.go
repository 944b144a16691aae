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

// abortAfter aborts mnt's connection after d (abortConnection), which
// fails every request in flight: a stranded request would otherwise hang
// the test and its cleanup. The caller stops the timer.
func abortAfter(t *testing.T, mnt string, d time.Duration) *time.Timer {
	t.Helper()
	dev := mountDev(mnt)
	if dev == 0 {
		t.Fatalf("%s is not a FUSE mount", mnt)
	}
	return time.AfterFunc(d, func() { abortConnection(dev) })
}

// TestReadersHelpers: one reader serves a connection's quick requests; a
// request that holds it gets a helper, so the requests behind it are
// answered; the helpers end once the slow request is; and no request is
// left unread on the way (the device is edge-triggered: a reader that
// ended with a request queued, whose wake-up another had taken, would
// strand it).
func TestReadersHelpers(t *testing.T) {
	mnt, _, srv := testMount(t, 16<<20, Options{Transport: TransportDevFuse})
	defer abortAfter(t, mnt, 30*time.Second).Stop()
	// At most one saturated helper (GOMAXPROCS/2), whatever the machine.
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(2))
	var sfs unix.Statfs_t
	readersAtMost := func(what string, n int32) {
		t.Helper()
		// A serial request lets a surplus reader find the queue empty.
		for end := time.Now().Add(5 * time.Second); srv.sess.readers.Load() > n && time.Now().Before(end); {
			if err := unix.Statfs(mnt, &sfs); err != nil {
				t.Fatal(err)
			}
			time.Sleep(time.Millisecond)
		}
		if got := srv.sess.readers.Load(); got > n {
			t.Errorf("%s: %d readers, want at most %d", what, got, n)
		}
	}

	// held makes the server hold the next STATFS the hook sees until
	// release is closed.
	var armed atomic.Bool
	entered := make(chan chan struct{})
	hook := func(in []byte) (bool, bool) {
		if uint32(in[4])|uint32(in[5])<<8 == opStatfs && armed.CompareAndSwap(true, false) {
			release := make(chan struct{})
			entered <- release
			<-release
		}
		return false, false
	}
	srv.sess.testHook.Store(&hook)

	for round := range 3 {
		// A request of the mount's own that took a tick may have got a
		// helper already: let it end, or it would answer for the watch.
		readersAtMost(fmt.Sprintf("round %d, before the held request", round), 1)
		helpers := srv.sess.stuckHelpers.Load()
		armed.Store(true)
		slow := make(chan error, 1)
		go func() {
			var sfs unix.Statfs_t
			slow <- unix.Statfs(mnt, &sfs)
		}()
		release := <-entered
		// Requests behind the held one: parallel and serial, a close's
		// RELEASE (sent in the background) among them.
		var wg sync.WaitGroup
		for range 8 {
			wg.Go(func() {
				var sfs unix.Statfs_t
				for range 100 {
					if err := unix.Statfs(mnt, &sfs); err != nil {
						t.Error(err)
						return
					}
				}
			})
		}
		wg.Wait()
		for i := range 100 {
			fd, err := unix.Open(mnt, unix.O_RDONLY|unix.O_DIRECTORY, 0)
			if err == nil {
				unix.Close(fd)
				err = unix.Statfs(mnt, &sfs)
			}
			if err != nil {
				close(release)
				t.Fatalf("round %d, serial request %d: %v", round, i, err)
			}
		}
		if srv.sess.stuckHelpers.Load() == helpers {
			t.Errorf("round %d: requests answered behind a held one, but no helper reader started", round)
		}
		close(release)
		if err := <-slow; err != nil {
			t.Fatalf("round %d: the held statfs: %v", round, err)
		}
		readersAtMost(fmt.Sprintf("round %d, after the held request", round), 1)
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

// TestReadersSaturated: a connection whose callers keep its reader busy
// for whole ticks gets helpers, up to half the CPUs the runtime uses,
// although no request holds a reader long; a lone caller gets none.
func TestReadersSaturated(t *testing.T) {
	mnt, _, srv := testMount(t, 16<<20, Options{Transport: TransportDevFuse})
	defer abortAfter(t, mnt, 30*time.Second).Stop()
	defer runtime.GOMAXPROCS(runtime.GOMAXPROCS(8))
	// Each STATFS takes 100 us of the server's CPU.
	hook := func(in []byte) (bool, bool) {
		if uint32(in[4])|uint32(in[5])<<8 == opStatfs {
			for end := time.Now().Add(100 * time.Microsecond); time.Now().Before(end); {
			}
		}
		return false, false
	}
	srv.sess.testHook.Store(&hook)
	// One caller (one thread) sending its requests back to back: the
	// reader often finds the next request before the queue is empty,
	// but a second reader could only take turns with it.
	func() {
		runtime.LockOSThread()
		defer runtime.UnlockOSThread()
		var sfs unix.Statfs_t
		for end := time.Now().Add(300 * time.Millisecond); time.Now().Before(end); {
			if err := unix.Statfs(mnt, &sfs); err != nil {
				t.Fatal(err)
			}
		}
	}()
	if n := srv.sess.saturatedHelpers.Load(); n != 0 {
		t.Errorf("%d helpers for one caller, want none", n)
	}
	// Eight callers keep requests queued.
	var stop atomic.Bool
	var wg sync.WaitGroup
	for range 8 {
		wg.Go(func() {
			var sfs unix.Statfs_t
			for !stop.Load() {
				if err := unix.Statfs(mnt, &sfs); err != nil {
					t.Error(err)
					return
				}
			}
		})
	}
	waitFor(t, "a helper reader", func() bool { return srv.sess.saturatedHelpers.Load() > 0 })
	stop.Store(true)
	wg.Wait()
}
