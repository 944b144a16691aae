package fusefs

import (
	"fmt"
	"os"
	"sync"
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
