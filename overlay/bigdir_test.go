package overlay

import (
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/csi-memfs/csi-memfs/internal/treetest"
	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// countingLower counts ReadDir calls of a Lower: one per merge.
type countingLower struct {
	Lower
	readDirs atomic.Int64
}

func (c *countingLower) ReadDir(path string) ([]LowerEntry, error) {
	c.readDirs.Add(1)
	return c.Lower.ReadDir(path)
}

func bigOverlay(t testing.TB, root string) (*FS, *countingLower) {
	t.Helper()
	dl, err := NewDirLower(root)
	if err != nil {
		t.Fatal(err)
	}
	l, err := memfs.New(t.TempDir()+"/upper", memfs.Options{Size: 512 << 20, Inodes: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	cl := &countingLower{Lower: dl}
	fs, err := New(l, cl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.CheckInvariants(); err != nil {
			t.Errorf("invariants: %v", err)
		}
		fs.Close()
		l.Close()
		dl.Close()
	})
	return fs, cl
}

// TestBigDirectoryNoMergePerChange removes every entry of a big merged
// directory, as rm -rf through FUSE does: an unlink or rmdir, then the
// GETATTR of the directory the kernel sends because the change made it
// drop the directory's attributes. The link count must not cost a merge of
// the directory per change: the whole removal merges it a bounded number
// of times, however big it is.
func TestBigDirectoryNoMergePerChange(t *testing.T) {
	const files, dirs = 2000, 20
	fs, cl := bigOverlay(t, treetest.BigLower(t, files, dirs))
	big, err := fs.Lookup(vfs.RootIno, "big")
	if err != nil {
		t.Fatal(err)
	}
	d := big.Ino()
	wantNlink := uint64(2 + dirs)
	check := func(when string) {
		t.Helper()
		st, err := fs.GetAttr(d)
		if err != nil {
			t.Fatal(err)
		}
		if uint64(st.Nlink) != wantNlink {
			t.Fatalf("%s: nlink %d, want %d", when, st.Nlink, wantNlink)
		}
	}
	check("before")
	// A new subdirectory and one renamed in count as well.
	if _, err := fs.Mkdir(d, "new", 0o755, vfs.Root); err != nil {
		t.Fatal(err)
	}
	wantNlink++
	check("after mkdir")
	if _, err := fs.Mkdir(vfs.RootIno, "moved", 0o755, vfs.Root); err != nil {
		t.Fatal(err)
	}
	if err := fs.Rename(vfs.RootIno, "moved", d, "moved", 0); err != nil {
		t.Fatal(err)
	}
	wantNlink++
	check("after rename in")
	before := cl.readDirs.Load()
	for i := range files {
		if err := fs.Unlink(d, "f"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		check("after unlink")
	}
	for _, name := range []string{"new", "moved"} {
		if err := fs.Rmdir(d, name); err != nil {
			t.Fatal(err)
		}
		wantNlink--
		check("after rmdir")
	}
	for i := range dirs {
		if err := fs.Rmdir(d, "d"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		wantNlink--
		check("after rmdir")
	}
	if got := cl.readDirs.Load() - before; got > 2*dirs+5 {
		t.Errorf("removing %d entries merged directories %d times", files+dirs, got)
	}
	if err := fs.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
	if err := fs.Rmdir(vfs.RootIno, "big"); err != nil {
		t.Fatalf("rmdir of the emptied directory: %v", err)
	}
}

// TestBigDirectoryRate is TestBigDirectoryNoMergePerChange's removal
// timed on a directory of CSI_MEMFS_BIG_DIR entries (200000 for the
// issue's figure), and a lookup in it against one in a 10-entry
// directory. A measurement, not a check of speed (the machine decides
// those figures): it logs them against issue 12's targets. Slow: set the
// variable to run it.
func TestBigDirectoryRate(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("CSI_MEMFS_BIG_DIR"))
	if n == 0 {
		t.Skip("set CSI_MEMFS_BIG_DIR=N to time a directory of N lower entries")
	}
	root := treetest.BigLower(t, n, 0)
	if err := os.Mkdir(filepath.Join(root, "small"), 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range 10 {
		os.WriteFile(filepath.Join(root, "small", "f"+strconv.Itoa(i)), nil, 0o644)
	}
	fs, _ := bigOverlay(t, root)
	big, _ := fs.Lookup(vfs.RootIno, "big")
	small, _ := fs.Lookup(vfs.RootIno, "small")
	lookup := func(dir uint64, name string) time.Duration {
		const rounds = 200
		start := time.Now()
		for range rounds {
			e, err := fs.Lookup(dir, name)
			if err != nil {
				t.Fatal(err)
			}
			fs.GetAttr(dir)
			fs.Forget(e.Ino(), 1)
		}
		return time.Since(start) / rounds
	}
	// A first change, so that the directory is merged (copied up).
	if err := fs.Unlink(big.Ino(), "f0"); err != nil {
		t.Fatal(err)
	}
	// The first GetAttr of a changed merged directory merges it, once.
	fs.GetAttr(big.Ino())
	fs.GetAttr(small.Ino())
	lb, ls := lookup(big.Ino(), "f1"), lookup(small.Ino(), "f1")
	t.Logf("lookup+getattr: %v in the %d-entry directory, %v in a 10-entry one", lb, n, ls)
	t.Logf("target: a lookup in the big directory within 2x of one in the small one; met: %v", lb <= 2*ls+50*time.Microsecond)
	start := time.Now()
	d := big.Ino()
	for i := 1; i < n; i++ {
		if err := fs.Unlink(d, "f"+strconv.Itoa(i)); err != nil {
			t.Fatal(err)
		}
		if _, err := fs.GetAttr(d); err != nil {
			t.Fatal(err)
		}
	}
	rate := float64(n-1) / time.Since(start).Seconds()
	t.Logf("removal: %.0f entries/s (unlink + getattr of the directory); target >= 20000 met: %v", rate, rate >= 20000)
}

// BenchmarkBigDirectoryUnlink removes entries of a merged 20,000-entry
// lower directory, each followed by a GETATTR of the directory.
func BenchmarkBigDirectoryUnlink(b *testing.B) {
	const n = 20000
	root := treetest.BigLower(b, n, 0)
	b.ResetTimer()
	for done := 0; done < b.N; {
		b.StopTimer()
		fs, _ := bigOverlay(b, root)
		big, _ := fs.Lookup(vfs.RootIno, "big")
		b.StartTimer()
		for i := 0; i < n && done < b.N; i, done = i+1, done+1 {
			if err := fs.Unlink(big.Ino(), "f"+strconv.Itoa(i)); err != nil {
				b.Fatal(err)
			}
			if _, err := fs.GetAttr(big.Ino()); err != nil {
				b.Fatal(err)
			}
		}
	}
}

// TestRenameKeepsSubdirCounts: renames of directories and files in and
// out of, within and across merged directories, exchanges, and a
// directory replacing an empty one keep both parents' link counts right
// without merging either again.
func TestRenameKeepsSubdirCounts(t *testing.T) {
	const dirs = 5
	fs, cl := bigOverlay(t, treetest.BigLower(t, 10, dirs))
	big, err := fs.Lookup(vfs.RootIno, "big")
	if err != nil {
		t.Fatal(err)
	}
	d := big.Ino()
	other, err := fs.Mkdir(vfs.RootIno, "other", 0o755, vfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	o := other.Ino()
	nlinks := func() (uint64, uint64) {
		t.Helper()
		a, err := fs.GetAttr(d)
		if err != nil {
			t.Fatal(err)
		}
		b, err := fs.GetAttr(o)
		if err != nil {
			t.Fatal(err)
		}
		return uint64(a.Nlink), uint64(b.Nlink)
	}
	// A first change copies big up; its count comes from one merge here.
	if err := fs.Unlink(d, "f9"); err != nil {
		t.Fatal(err)
	}
	nlinks()
	var merges int64
	if _, err := fs.Mkdir(o, "empty", 0o755, vfs.Root); err != nil {
		t.Fatal(err)
	}
	for _, step := range []struct {
		what               string
		from               uint64
		name               string
		to                 uint64
		newName            string
		flags              uint32
		wantBig, wantOther uint64
	}{
		{"lower dir out", d, "d0", o, "d0", 0, 2 + dirs - 1, 2 + 2},
		{"lower dir within", d, "d1", d, "d1b", 0, 2 + dirs - 1, 2 + 2},
		{"file out", d, "f0", o, "f0", 0, 2 + dirs - 1, 2 + 2},
		{"dir back in", o, "d0", d, "d0", 0, 2 + dirs, 2 + 1},
		{"dir over an empty dir", d, "d2", o, "empty", 0, 2 + dirs - 1, 2 + 1},
		{"exchange dir and file", d, "d3", o, "f0", vfs.RenameExchange, 2 + dirs - 2, 2 + 2},
		{"exchange two dirs", d, "d4", o, "empty", vfs.RenameExchange, 2 + dirs - 2, 2 + 2},
		{"noreplace dir in", o, "f0", d, "d5", vfs.RenameNoReplace, 2 + dirs - 1, 2 + 1},
	} {
		start := cl.readDirs.Load()
		if err := fs.Rename(step.from, step.name, step.to, step.newName, step.flags); err != nil {
			t.Fatalf("%s: %v", step.what, err)
		}
		if b, oth := nlinks(); b != step.wantBig || oth != step.wantOther {
			t.Errorf("%s: nlink %d and %d, want %d and %d", step.what, b, oth, step.wantBig, step.wantOther)
		}
		merges += cl.readDirs.Load() - start
		// CheckInvariants merges every directory to check the counts.
		if err := fs.CheckInvariants(); err != nil {
			t.Fatalf("%s: %v", step.what, err)
		}
	}
	// A failed rename (a directory over a file) changes nothing.
	start := cl.readDirs.Load()
	if err := fs.Rename(d, "d0", d, "f1", 0); err != syscall.ENOTDIR {
		t.Fatalf("dir over file: %v, want ENOTDIR", err)
	}
	if merges += cl.readDirs.Load() - start; merges != 0 {
		t.Errorf("the renames merged directories %d times", merges)
	}
	if b, oth := nlinks(); b != 2+dirs-1 || oth != 2+1 {
		t.Errorf("after a failed rename: nlink %d and %d", b, oth)
	}
}

// TestSharedWhiteout: removing lower names, directly or by renaming them
// away, links the shared whiteout in their place (no inode each); a
// successor FS over the same layers finds the same one; whiteouts of their
// own inode (made by earlier versions) still hide their names; a name
// created over a whiteout drops its link.
func TestSharedWhiteout(t *testing.T) {
	fs, _ := bigOverlay(t, treetest.BigLower(t, 10, 2))
	big, err := fs.Lookup(vfs.RootIno, "big")
	if err != nil {
		t.Fatal(err)
	}
	d := big.Ino()
	for _, name := range []string{"f0", "f1", "f2"} {
		if err := fs.Unlink(d, name); err != nil {
			t.Fatal(err)
		}
	}
	if err := fs.Rmdir(d, "d0"); err != nil {
		t.Fatal(err)
	}
	if err := fs.Rename(d, "f3", vfs.RootIno, "f3", 0); err != nil {
		t.Fatal(err)
	}
	// An old-style whiteout: an inode of its own with the marker.
	tmp := fs.tmpName()
	if err := fs.makeWhiteout(tmp); err != nil {
		t.Fatal(err)
	}
	bu := fs.nodes[d].upper
	if err := fs.upper.Rename(fs.workIno, tmp, bu, "f4", 0); err != nil {
		t.Fatal(err)
	}
	linksOf := func(fs *FS) uint32 {
		t.Helper()
		st, err := fs.upper.GetAttr(fs.whiteoutIno)
		if err != nil {
			t.Fatal(err)
		}
		return uint32(st.Nlink)
	}
	if got := linksOf(fs); got != 1+5 {
		t.Errorf("shared whiteout has %d links, want 6", got)
	}
	for _, name := range []string{"f0", "f1", "f2", "d0", "f3"} {
		e, err := fs.upper.Lookup(bu, name)
		if err != nil {
			t.Fatalf("upper %s: %v", name, err)
		}
		fs.upper.Forget(e.Ino(), 1)
		if e.Ino() != fs.whiteoutIno {
			t.Errorf("upper %s is inode %d, not the shared whiteout %d", name, e.Ino(), fs.whiteoutIno)
		}
	}
	// A successor process: a new FS over the same layers.
	next, err := New(fs.upper, fs.lower)
	if err != nil {
		t.Fatal(err)
	}
	defer next.Close()
	if next.whiteoutIno != fs.whiteoutIno {
		t.Errorf("successor's shared whiteout is %d, was %d", next.whiteoutIno, fs.whiteoutIno)
	}
	nb, err := next.Lookup(vfs.RootIno, "big")
	if err != nil {
		t.Fatal(err)
	}
	defer next.Forget(nb.Ino(), 1)
	for _, name := range []string{"f0", "f1", "f2", "f3", "f4", "d0"} {
		if _, err := next.Lookup(nb.Ino(), name); err != syscall.ENOENT {
			t.Errorf("lookup of removed %s: %v, want ENOENT", name, err)
		}
	}
	var names []string
	dir, err := next.OpenDir(nb.Ino())
	if err != nil {
		t.Fatal(err)
	}
	dir.ReadDir(0, func(e *vfs.DirEntry) bool {
		names = append(names, e.Name)
		return true
	})
	dir.Close()
	slices.Sort(names)
	if want := ". .. d1 f5 f6 f7 f8 f9"; strings.Join(names, " ") != want {
		t.Errorf("listing %q, want %q", names, want)
	}
	if _, err := next.Mkdir(nb.Ino(), "f0", 0o755, vfs.Root); err != nil {
		t.Fatal(err)
	}
	if got := linksOf(next); got != 1+4 {
		t.Errorf("after a mkdir over a whiteout the shared one has %d links, want 5", got)
	}
	if err := next.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}
