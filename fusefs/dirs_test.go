package fusefs

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"sync/atomic"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/overlay"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// getdentsNames reads at most max bytes of directory entries from fd and
// returns their names, "." and ".." left out, and whether the directory
// ended.
func getdentsNames(t *testing.T, fd, max int) ([]string, bool) {
	t.Helper()
	buf := make([]byte, max)
	n, err := unix.Getdents(fd, buf)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for b := buf[:n]; len(b) > 0; {
		reclen := int(binary.NativeEndian.Uint16(b[16:]))
		name := b[19:reclen]
		for i, c := range name {
			if c == 0 {
				name = name[:i]
				break
			}
		}
		if s := string(name); s != "." && s != ".." {
			names = append(names, s)
		}
		b = b[reclen:]
	}
	return names, n == 0
}

// TestReadDirWithoutOpenAcrossAdopt: directories are read without OPENDIR,
// by node id and offset. A directory read in part before a stop is read
// on by the successor, which never opened it nor looked it up, and every
// entry shows exactly once; a fresh mount sends one OPENDIR (answered
// ENOSYS) and no RELEASEDIR, ever.
func TestReadDirWithoutOpenAcrossAdopt(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt, srv := mountUnmanaged(t, base, l, Options{})
	const n = 600
	dir := filepath.Join(mnt, "d")
	os.Mkdir(dir, 0o755)
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("file-with-a-longish-name-%04d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		names, err := os.ReadDir(dir)
		if err != nil || len(names) != n {
			t.Fatalf("readdir: %d names, %v", len(names), err)
		}
	}
	// The kernel drops its cache of d when d changes: this one reads d
	// afresh, a page at a time, as the reader asks.
	os.WriteFile(filepath.Join(dir, "file-with-a-longish-name-last"), nil, 0o644)
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	first, _ := getdentsNames(t, fd, 1024)
	for _, s := range first {
		seen[s]++
	}
	if c := srv.RequestCounts(); c["OPENDIR"] != 1 || c["RELEASEDIR"] != 0 {
		t.Errorf("OPENDIR %d, RELEASEDIR %d; want 1, 0", c["OPENDIR"], c["RELEASEDIR"])
	}
	sess, err := srv.Stop()
	if err != nil {
		t.Fatal(err)
	}
	srv2, err := Adopt(mnt, sess, adoptLayer(t, l), Options{}, false)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	defer func() {
		unix.Close(fd)
		if err := srv2.Unmount(); err != nil {
			t.Error(err)
		}
	}()
	for {
		names, end := getdentsNames(t, fd, 4096)
		if end {
			break
		}
		for _, s := range names {
			seen[s]++
		}
	}
	if len(seen) != n+1 {
		t.Errorf("%d names read across the adopt, want %d", len(seen), n+1)
	}
	for s, c := range seen {
		if c != 1 {
			t.Errorf("%s read %d times", s, c)
		}
	}
	if c := srv2.RequestCounts(); c["OPENDIR"] != 0 || c["READDIR"]+c["READDIRPLUS"] == 0 {
		t.Errorf("the successor served OPENDIR %d, READDIR %d, READDIRPLUS %d", c["OPENDIR"], c["READDIR"], c["READDIRPLUS"])
	}
	// Entries a successor answered in READDIRPLUS are known to it.
	if _, err := os.Stat(filepath.Join(dir, "file-with-a-longish-name-0599")); err != nil {
		t.Error(err)
	}
}

// lookupCounter is the file system it wraps, counting the Lookups the
// server makes in it. Held is passed on; the other optional interfaces
// are left out, as these tests need none.
type lookupCounter struct {
	vfs.FS
	n atomic.Int64
}

func (c *lookupCounter) Lookup(parent uint64, name string) (vfs.Entry, error) {
	c.n.Add(1)
	return c.FS.Lookup(parent, name)
}

func (c *lookupCounter) Held(ino uint64) bool { return c.FS.(vfs.Holder).Held(ino) }

// requestsSince returns the requests srv served since before, by
// operation, FORGETs left out (they come when the kernel pleases).
func requestsSince(srv *Server, before map[string]uint64) map[string]uint64 {
	d := map[string]uint64{}
	for op, v := range srv.RequestCounts() {
		if v > before[op] && op != "FORGET" && op != "BATCH_FORGET" {
			d[op] = v - before[op]
		}
	}
	return d
}

// listThenStat lists dir, which must hold the names want (nothing else),
// then lstats every entry as ls -l does and checks its size against
// want. It returns the Lookups c saw during the listing and the requests
// the listing and the stats cost srv.
func listThenStat(t *testing.T, srv *Server, c *lookupCounter, dir string, want map[string]int64) (lookups int64, list, stats map[string]uint64) {
	t.Helper()
	if _, err := os.Lstat(dir); err != nil {
		t.Fatal(err)
	}
	before, n := srv.RequestCounts(), c.n.Load()
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	lookups, list = c.n.Load()-n, requestsSince(srv, before)
	if len(ents) != len(want) {
		t.Errorf("%s: %d entries, want %d", dir, len(ents), len(want))
	}
	before = srv.RequestCounts()
	for _, e := range ents {
		fi, err := os.Lstat(filepath.Join(dir, e.Name()))
		if size, ok := want[e.Name()]; err != nil || !ok || fi.Size() != size {
			t.Errorf("%s: %v (size %d, want %d of %v)", e.Name(), err, fi.Size(), size, ok)
		}
	}
	return lookups, list, requestsSince(srv, before)
}

// plusFiles makes n files f000... in dir through whatever made dir, file
// i holding 1+i%7 bytes, and returns their names and sizes. Each is
// written: a write-only open marks its file stale at RELEASE, and only a
// write has the kernel ask for the attributes that make it fresh again.
func plusFiles(t *testing.T, dir string, n int) map[string]int64 {
	t.Helper()
	want := map[string]int64{}
	for i := range n {
		name := fmt.Sprintf("f%03d", i)
		if err := os.WriteFile(filepath.Join(dir, name), make([]byte, 1+i%7), 0o644); err != nil {
			t.Fatal(err)
		}
		want[name] = int64(1 + i%7)
	}
	return want
}

// statAll lstats every name of want in dir.
func statAll(t *testing.T, dir string, want map[string]int64) {
	t.Helper()
	for name := range want {
		if _, err := os.Lstat(filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
	}
}

// plusMounts mounts a memory volume and an overlay volume (over lower),
// each served through a lookupCounter, with passthrough, and runs fn on
// each. layerDir is the memory volume's tmpfs, before the mount.
func plusMounts(t *testing.T, lower string, before func(layerDir string), fn func(t *testing.T, mnt string, srv *Server, c *lookupCounter)) {
	t.Run("memory", func(t *testing.T) {
		base, l := newTestLayer(t, 64<<20)
		if before != nil {
			before(l.Dir())
		}
		c := &lookupCounter{FS: l}
		mnt, srv := mountTest(t, base, c, Options{})
		fn(t, mnt, srv, c)
	})
	t.Run("overlay", func(t *testing.T) {
		base, l := newTestLayer(t, 64<<20)
		dl, err := overlay.NewDirLower(lower)
		if err != nil {
			t.Fatal(err)
		}
		ofs, err := overlay.New(l, dl)
		if err != nil {
			dl.Close()
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if err := ofs.CheckInvariants(); err != nil {
				t.Errorf("invariants after unmount: %v", err)
			}
			ofs.Close()
			dl.Close()
		})
		c := &lookupCounter{FS: ofs}
		mnt, srv := mountTest(t, base, c, Options{})
		fn(t, mnt, srv, c)
	})
}

// TestReadDirPlusHeld: entries the kernel holds (made, or looked up, and
// stat'ed) are listed with no Lookup in the file system, and stats
// after the listing send no LOOKUP: the kernel kept its dentries. On an
// overlay, lower entries the same.
func TestReadDirPlusHeld(t *testing.T) {
	requireFUSE(t)
	const n = 300
	lower := t.TempDir()
	os.Mkdir(filepath.Join(lower, "low"), 0o755)
	lowWant := plusFiles(t, filepath.Join(lower, "low"), n)
	plusMounts(t, lower, nil, func(t *testing.T, mnt string, srv *Server, c *lookupCounter) {
		dirs := map[string]map[string]int64{}
		dir := filepath.Join(mnt, "new")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		before := srv.RequestCounts()["RELEASE"]
		dirs[dir] = plusFiles(t, dir, n)
		// Their RELEASEs before the stats: a write-only writer's
		// marks its file stale (rawfs_stale.go), which a stat after it
		// would have made fresh again.
		waitReleased(t, srv, before, n)
		if t.Name() == "TestReadDirPlusHeld/overlay" {
			dirs[filepath.Join(mnt, "low")] = lowWant
		}
		for dir, want := range dirs {
			statAll(t, dir, want)
			lookups, list, stats := listThenStat(t, srv, c, dir, want)
			t.Logf("%s: listing %s, %d Lookups; stats %s", dir, fmtCounts(list), lookups, fmtCounts(stats))
			if lookups != 0 || list["READDIRPLUS"] == 0 {
				t.Errorf("%s: the listing made %d Lookups in %d READDIRPLUS; want none in at least one", dir, lookups, list["READDIRPLUS"])
			}
			if stats["LOOKUP"] != 0 {
				t.Errorf("%s: the stats after the listing sent %d LOOKUPs, want none", dir, stats["LOOKUP"])
			}
		}
	})
}

// TestReadDirPlusRefreshesStale: files just written, whose size and times
// the kernel marked stale at their writes, are listed with full answers
// although the kernel holds them, so that the stats after the listing
// send no GETATTR: find and ls -l after cp.
func TestReadDirPlusRefreshesStale(t *testing.T) {
	requireFUSE(t)
	const n = 40 // all in the first READDIRPLUS
	plusMounts(t, t.TempDir(), nil, func(t *testing.T, mnt string, srv *Server, c *lookupCounter) {
		dir := filepath.Join(mnt, "written")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		before := srv.RequestCounts()["RELEASE"]
		want := plusFiles(t, dir, n)
		waitReleased(t, srv, before, n)
		lookups, list, stats := listThenStat(t, srv, c, dir, want)
		t.Logf("listing %s, %d Lookups; stats %s", fmtCounts(list), lookups, fmtCounts(stats))
		if lookups != n {
			t.Errorf("the listing made %d Lookups, want %d (one per written file)", lookups, n)
		}
		if stats["GETATTR"]+stats["STATX"]+stats["LOOKUP"] != 0 {
			t.Errorf("the stats after the listing sent %s; want no request", fmtCounts(stats))
		}
	})
}

// TestReadDirPlusCold: a directory the kernel holds nothing of, on a
// fresh mount over existing files, is listed with every entry looked up
// and answered in full: the stats after the listing send no LOOKUP.
func TestReadDirPlusCold(t *testing.T) {
	requireFUSE(t)
	const n = 20 // all in the first READDIRPLUS
	lower := t.TempDir()
	os.Mkdir(filepath.Join(lower, "cold"), 0o755)
	want := plusFiles(t, filepath.Join(lower, "cold"), n)
	plusMounts(t, lower, func(layerDir string) {
		os.Mkdir(filepath.Join(layerDir, "cold"), 0o755)
		plusFiles(t, filepath.Join(layerDir, "cold"), n)
	}, func(t *testing.T, mnt string, srv *Server, c *lookupCounter) {
		dir := filepath.Join(mnt, "cold")
		lookups, list, stats := listThenStat(t, srv, c, dir, want)
		t.Logf("listing %s, %d Lookups; stats %s", fmtCounts(list), lookups, fmtCounts(stats))
		if lookups != n || list["READDIRPLUS"] == 0 {
			t.Errorf("the listing made %d Lookups in %d READDIRPLUS; want %d", lookups, list["READDIRPLUS"], n)
		}
		if stats["LOOKUP"] != 0 {
			t.Errorf("the stats after the listing sent %d LOOKUPs, want none", stats["LOOKUP"])
		}
	})
}

// TestReadDirPlusAcrossAdopt: a successor holds none of the entries the
// kernel holds: it answers them in full (Lookups), then knows them, and a
// listing after a change of the directory makes no Lookup. Names, sizes
// and the lookup counts stay right throughout.
func TestReadDirPlusAcrossAdopt(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt, srv := mountUnmanaged(t, base, l, Options{})
	const n = 40 // all in the first READDIRPLUS
	dir := filepath.Join(mnt, "d")
	os.Mkdir(dir, 0o755)
	want := plusFiles(t, dir, n)
	statAll(t, dir, want)
	sess, err := srv.Stop()
	if err != nil {
		t.Fatal(err)
	}
	l2 := adoptLayer(t, l)
	c := &lookupCounter{FS: l2}
	srv2, err := Adopt(mnt, sess, c, Options{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := srv2.Unmount(); err != nil {
			t.Error(err)
		}
		if err := l2.CheckInvariants(); err != nil {
			t.Errorf("successor's invariants after unmount: %v", err)
		}
		l2.Detach()
	}()
	for i, wantLookups := range []string{"some", "none"} {
		// A change of the directory makes the kernel read it again (a
		// symlink: no writer whose RELEASE would make the kernel drop
		// the new entry's attributes, see TestReadDirPlusRefreshesStale).
		name := fmt.Sprintf("new%d", i)
		if err := os.Symlink("t", filepath.Join(dir, name)); err != nil {
			t.Fatal(err)
		}
		want[name] = 1
		lookups, list, stats := listThenStat(t, srv2, c, dir, want)
		t.Logf("listing %d: %s, %d Lookups; stats %s", i, fmtCounts(list), lookups, fmtCounts(stats))
		if list["READDIRPLUS"] == 0 || (wantLookups == "none") != (lookups == 0) {
			t.Errorf("listing %d made %d Lookups in %d READDIRPLUS; want %s", i, lookups, list["READDIRPLUS"], wantLookups)
		}
		if stats["LOOKUP"] != 0 {
			t.Errorf("listing %d: the stats after it sent %d LOOKUPs, want none", i, stats["LOOKUP"])
		}
	}
	// The successor's references are the kernel's: removing every file
	// leaves the table clean (checked at the end).
	for name := range want {
		if err := os.Remove(filepath.Join(dir, name)); err != nil {
			t.Error(err)
		}
	}
}

// waitServed waits until the requests srv has read are served: its
// counts grow when a reader takes a request, before the reader serves it
// (a RELEASE's invalidation and unregistration come after), and a reader
// counts itself idle again only once it has. Requests that come over
// io_uring are not the readers': srv must serve /dev/fuse.
func waitServed(t *testing.T, srv *Server) {
	t.Helper()
	if srv.sess.ring != nil {
		t.Fatal("waitServed: the ring's requests are served by its queues, not the readers")
	}
	waitFor(t, "the requests read to be served", func() bool {
		return srv.sess.idle.Load() == srv.sess.readers.Load()
	})
}

// waitReleased waits until n RELEASEs more than before have been read and
// served.
func waitReleased(t *testing.T, srv *Server, before uint64, n int) {
	t.Helper()
	waitFor(t, "the writers' RELEASEs", func() bool { return srv.RequestCounts()["RELEASE"]-before >= uint64(n) })
	waitServed(t, srv)
}

// waitFor waits up to 10 s for cond, polling; then fails the test, naming
// what it waited for.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); !cond(); time.Sleep(time.Millisecond) {
		if time.Now().After(deadline) {
			t.Fatalf("waited 10 s for %s", what)
		}
	}
}
