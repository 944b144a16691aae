package fusefs

import (
	"os"
	"path/filepath"
	"sort"
	"testing"

	"github.com/hanwen/go-fuse/v2/posixtest"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// requireFUSE skips tests that need root and /dev/fuse where they are
// missing; CI has both, so there the tests always run.
func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs and FUSE")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
}

// newTestLayer makes a memory layer of size bytes in a fresh directory
// that other users can reach (some tests act as uid 1000). Cleanup checks
// its invariants and closes it.
func newTestLayer(t testing.TB, size int64) (string, *memfs.Layer) {
	t.Helper()
	requireFUSE(t)
	base := t.TempDir()
	os.Chmod(filepath.Dir(base), 0o755)
	os.Chmod(base, 0o755)
	l, err := memfs.New(filepath.Join(base, "upper"), memfs.Options{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	closeAtCleanup(t, l, " after unmount")
	return base, l
}

// closeAtCleanup checks l's invariants and closes it, which unmounts the
// instance, when t ends; when says when, for messages.
func closeAtCleanup(t testing.TB, l *memfs.Layer, when string) {
	t.Cleanup(func() {
		if err := l.CheckInvariants(); err != nil {
			t.Errorf("invariants%s: %v", when, err)
		}
		if err := l.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
}

// mountTest mounts fs on base/mnt; cleanup unmounts it before any cleanup
// registered earlier runs.
func mountTest(t testing.TB, base string, fs vfs.FS, opts Options) (string, *Server) {
	t.Helper()
	mnt, srv := mountUnmanaged(t, base, fs, opts)
	t.Cleanup(func() {
		if err := srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	return mnt, srv
}

// mountUnmanaged mounts fs at base/mnt and returns the mountpoint and the
// server, which the test stops or unmounts itself (takeover tests).
func mountUnmanaged(t testing.TB, base string, fs vfs.FS, opts Options) (string, *Server) {
	t.Helper()
	mnt := filepath.Join(base, "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	srv, err := Mount(mnt, fs, opts)
	if err != nil {
		t.Fatal(err)
	}
	return mnt, srv
}

// testMount mounts a fresh memory volume of size bytes and returns its
// mountpoint, layer and server. Cleanup unmounts it and checks the layer.
func testMount(t testing.TB, size int64, opts Options) (string, *memfs.Layer, *Server) {
	t.Helper()
	base, l := newTestLayer(t, size)
	mnt, srv := mountTest(t, base, l, opts)
	return mnt, l, srv
}

// posixSkips are the posixtest cases that do not apply, with the reason.
var posixSkips = map[string]string{
	// The test itself is wrong: it fails on kernel tmpfs too.
	"FcntlFlockLocksFile": "fails on kernel tmpfs as well; the test's expectation is not Linux's",
}

// eachPosix runs every posixtest case but posixSkips, in sorted order, each
// in a fresh directory that dir makes.
func eachPosix(t *testing.T, dir func(t *testing.T) string) {
	names := make([]string, 0, len(posixtest.All))
	for n := range posixtest.All {
		names = append(names, n)
	}
	sort.Strings(names)
	for _, name := range names {
		t.Run(name, func(t *testing.T) {
			if why, ok := posixSkips[name]; ok {
				t.Skip(why)
			}
			posixtest.All[name](t, dir(t))
		})
	}
}

func runPosix(t *testing.T, opts Options) {
	eachPosix(t, func(t *testing.T) string {
		mnt, _, _ := testMount(t, 256<<20, opts)
		return mnt
	})
}

func TestPosixPassthrough(t *testing.T) { runPosix(t, Options{}) }

func TestPosixDaemonIO(t *testing.T) { runPosix(t, Options{DisablePassthrough: true}) }

// TestPosixOnTmpfs runs the suite on kernel tmpfs, the oracle: a case that
// fails here is the test's fault, not ours.
func TestPosixOnTmpfs(t *testing.T) {
	eachPosix(t, func(t *testing.T) string {
		_, l := newTestLayer(t, 256<<20)
		return l.Dir()
	})
}
