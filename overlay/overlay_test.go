package overlay

import (
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

func TestRangeSet(t *testing.T) {
	var s rangeSet
	s = s.add(10, 20)
	s = s.add(30, 40)
	s = s.add(20, 25) // adjacent: merges
	s = s.add(0, 2)
	if got, want := fmt.Sprint(s), "[{0 2} {10 25} {30 40}]"; got != want {
		t.Errorf("add: got %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(s.gaps(0, 50)), "[{2 10} {25 30} {40 50}]"; got != want {
		t.Errorf("gaps: got %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(s.gaps(12, 24)), "[]"; got != want {
		t.Errorf("gaps inside: got %s, want %s", got, want)
	}
	if got, want := fmt.Sprint(s.clip(35)), "[{0 2} {10 25} {30 35}]"; got != want {
		t.Errorf("clip: got %s, want %s", got, want)
	}
	s = s.add(1, 35)
	if got, want := fmt.Sprint(s), "[{0 40}]"; got != want {
		t.Errorf("add spanning: got %s, want %s", got, want)
	}
	limit, got, err := decodeRanges(encodeRanges(99, s))
	if err != nil || limit != 99 || fmt.Sprint(got) != fmt.Sprint(s) {
		t.Errorf("round trip: %d %v %v", limit, got, err)
	}
	for _, bad := range []string{"", "x", "5 3-2", "5 1-3 2-4", "5 1-"} {
		if _, _, err := decodeRanges([]byte(bad)); err == nil {
			t.Errorf("decodeRanges(%q) accepted", bad)
		}
	}
}

func TestMetaEncoding(t *testing.T) {
	for _, m := range []meta{
		{whiteout: true},
		{ino: 42},
		{ino: lowerBit | 7, hasLower: true, lowerPath: "a/b c/d\n"},
		{ino: lowerBit | 7, hasLower: true, lowerPath: ""},
	} {
		got, err := decodeMeta(m.encode())
		if err != nil || got != m {
			t.Errorf("round trip of %+v: %+v %v", m, got, err)
		}
	}
}

// TestDirLowerStaysBeneath checks that no path leaves the lower root.
func TestDirLowerStaysBeneath(t *testing.T) {
	root := makeLower(t)
	outside := filepath.Join(filepath.Dir(root), "outside-secret")
	os.WriteFile(outside, []byte("secret"), 0o644)
	os.Symlink(outside, filepath.Join(root, "abs"))
	os.Symlink("..", filepath.Join(root, "up"))
	l, err := NewDirLower(root)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, path := range []string{"abs", "up/outside-secret", "../outside-secret", "a/escape", "a/link", "/etc/passwd", "a/../../x"} {
		if f, err := l.Open(path); err == nil {
			f.Close()
			t.Errorf("Open(%q) succeeded", path)
		}
	}
	if st, err := l.Lstat("abs"); err != nil || st.Mode&unix.S_IFMT != unix.S_IFLNK {
		t.Errorf("Lstat of a symlink: %v, mode %o", err, st.Mode)
	}
	if _, err := l.Lstat("up/outside-secret"); err == nil {
		t.Errorf("Lstat through a symlink: %v", err)
	}
	if _, err := l.ReadDir("up"); err == nil {
		t.Errorf("ReadDir through a symlink succeeded")
	}
	if target, err := l.Readlink("a/escape"); err != nil || target != "../../etc/passwd" {
		t.Errorf("Readlink: %q %v", target, err)
	}
	if _, err := l.Readlink("a/f1"); err != syscall.EINVAL {
		t.Errorf("Readlink of a file: %v", err)
	}
	if v, err := l.GetXattr("a/f1", "user.test"); err != nil || string(v) != "v1" {
		t.Errorf("GetXattr: %q %v", v, err)
	}
}

// TestAppendToHugeLowerFile appends one byte to a 1 GiB lower file: only
// the last page may be copied, quickly, and the rest still reads from the
// lower.
func TestAppendToHugeLowerFile(t *testing.T) {
	root := t.TempDir()
	const size = 1 << 30
	f, err := os.Create(filepath.Join(root, "huge"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("tail"), size-4)
	f.Close()
	fs := newOverlay(t, root)
	e, err := fs.Lookup(vfs.RootIno, "huge")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(e.Ino(), 1)
	before, _ := fs.Usage()
	start := time.Now()
	of, err := fs.Open(e.Ino(), unix.O_WRONLY|unix.O_APPEND, vfs.OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if of.Direct() {
		t.Errorf("a partly copied-up file is direct")
	}
	if n, err := of.WriteAt([]byte("!"), size, false); n != 1 || err != nil {
		t.Fatalf("append: %d %v", n, err)
	}
	of.Release()
	elapsed := time.Since(start)
	after, _ := fs.Usage()
	t.Logf("append to a 1 GiB lower file: %v, %d bytes copied up, upper grew by %d bytes", elapsed, after.CopiedUpBytes, after.BytesUsed-before.BytesUsed)
	if after.CopiedUpBytes > 4096 {
		t.Errorf("copied up %d bytes", after.CopiedUpBytes)
	}
	if grew := after.BytesUsed - before.BytesUsed; grew > 1<<20 {
		t.Errorf("upper grew by %d bytes", grew)
	}
	rf, err := fs.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer rf.Release()
	for off, want := range map[int64]string{0: "head", size - 4: "tail!", 1 << 29: "\x00\x00"} {
		buf := make([]byte, len(want)+3)
		n, err := rf.ReadAt(buf, off)
		if err != nil || n < len(want) || string(buf[:len(want)]) != want {
			t.Errorf("read at %d: %q %v, want %q", off, buf[:n], err, want)
		}
	}
	st, err := rf.Stat()
	if err != nil || st.Size != size+1 || st.Ino != e.Ino() {
		t.Errorf("stat: size %d ino %#x %v", st.Size, st.Ino, err)
	}
}

// TestLowerPassthroughFd offers the lower file's descriptor for reads of a
// file entirely in the lower, and stops offering it once copied up.
func TestLowerPassthroughFd(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	e, err := fs.Lookup(vfs.RootIno, "top")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(e.Ino(), 1)
	rf, err := fs.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if !rf.Direct() || rf.Fd() < 0 {
		t.Fatalf("lower read open: direct %v fd %d", rf.Direct(), rf.Fd())
	}
	buf := make([]byte, 16)
	if n, _ := unix.Pread(rf.Fd(), buf, 0); string(buf[:n]) != "top file" {
		t.Errorf("read on the lower fd: %q", buf[:n])
	}
	if _, err := unix.Pwrite(rf.Fd(), []byte("x"), 0); err == nil {
		t.Errorf("the lower fd is writable")
	}
	wf, err := fs.Open(e.Ino(), unix.O_RDWR, vfs.OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if wf.Direct() {
		t.Errorf("upper open direct while a lower passthrough open exists")
	}
	wf.WriteAt([]byte("TOP"), 0, false)
	wf.Release()
	// In-process reads follow the copy-up.
	if n, _ := rf.ReadAt(buf, 0); string(buf[:n]) != "TOP file" {
		t.Errorf("read after copy-up: %q", buf[:n])
	}
	rf.Release()
	rf2, err := fs.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	defer rf2.Release()
	if !rf2.Direct() {
		t.Errorf("whole upper file not direct")
	}
	if n, _ := unix.Pread(rf2.Fd(), buf, 0); string(buf[:n]) != "TOP file" {
		t.Errorf("read on the upper fd: %q", buf[:n])
	}
}

// TestConcurrent runs lookups, reads, writes, renames and readdirs at once;
// run with -race.
func TestConcurrent(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	s := overlayT(fs)
	var wg sync.WaitGroup
	for w := 0; w < 4; w++ {
		wg.Add(1)
		go func(w int) {
			defer wg.Done()
			for i := 0; i < 60; i++ {
				switch (i + w) % 6 {
				case 0:
					onPath(s, "a/big", func(ino uint64) string {
						f, err := s.Open(ino, unix.O_RDWR, s.opts)
						if err == nil {
							f.WriteAt([]byte{byte(i)}, int64(i*5000), false)
							f.Release()
						}
						return ""
					})
				case 1:
					onPath(s, "a/big", func(ino uint64) string {
						f, err := s.Open(ino, unix.O_RDONLY, s.opts)
						if err == nil {
							buf := make([]byte, 10000)
							f.ReadAt(buf, int64(i*3000))
							f.Release()
						}
						return ""
					})
				case 2:
					onPath(s, "", func(ino uint64) string {
						name := fmt.Sprintf("n%d", w)
						s.Rename(ino, "e", ino, name, 0)
						s.Rename(ino, name, ino, "e", 0)
						return ""
					})
				case 3:
					onPath(s, "a", func(ino uint64) string {
						s.readDir(ino)
						return ""
					})
				case 4:
					onPath(s, "c", func(ino uint64) string {
						name := fmt.Sprintf("f%d", w)
						e, f, err := s.Create(ino, name, unix.O_RDWR, 0o644, vfs.Root, s.opts)
						if err == nil {
							f.Release()
							s.Forget(e.Ino(), 1)
							s.Unlink(ino, name)
						}
						return ""
					})
				case 5:
					onPath(s, "a/hl", func(ino uint64) string {
						s.GetAttr(ino)
						return ""
					})
				}
			}
		}(w)
	}
	wg.Wait()
	if err := fs.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}

// TestWorkDirHidden checks that users neither see nor make WorkName, and
// that a new FS removes a copy-up's leftovers.
func TestWorkDirHidden(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	if _, err := fs.Lookup(vfs.RootIno, WorkName); err != syscall.ENOENT {
		t.Errorf("lookup of the work directory: %v", err)
	}
	if _, err := fs.Mkdir(vfs.RootIno, WorkName, 0o755, vfs.Root); err != syscall.EPERM {
		t.Errorf("mkdir of the work directory: %v", err)
	}
	ents, _ := overlayT(fs).readDir(vfs.RootIno)
	for _, e := range ents {
		if e.Name == WorkName {
			t.Errorf("readdir shows the work directory")
		}
	}
	// A leftover from an interrupted copy-up.
	e, err := fs.upper.Mkdir(fs.workIno, "t999", 0o755, vfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	fs.upper.Forget(e.Ino(), 1)
	// And from an interrupted create over a whiteout: a default ACL lent
	// to the work directory (user::rwx group::r-x other::---).
	acl := []byte{2, 0, 0, 0, 1, 0, 7, 0, 0xff, 0xff, 0xff, 0xff, 4, 0, 5, 0, 0xff, 0xff, 0xff, 0xff, 0x20, 0, 0, 0, 0xff, 0xff, 0xff, 0xff}
	if err := fs.upper.SetXattr(fs.workIno, aclDefault, acl, 0); err != nil {
		t.Fatal(err)
	}
	fs2, err := New(fs.upper, fs.lower)
	if err != nil {
		t.Fatal(err)
	}
	defer fs2.Close()
	if _, err := fs.upper.Lookup(fs.workIno, "t999"); err != syscall.ENOENT {
		t.Errorf("leftover survives: %v", err)
	}
	if _, err := fs.upper.GetXattr(fs.workIno, aclDefault, nil); err != syscall.ENODATA {
		t.Errorf("a default ACL lent to the work directory survives: %v", err)
	}
}

// TestCopyUpFailureLeavesNothing fills the upper so that copy-up fails,
// and checks that the visible tree is unchanged and nothing half-made is
// left.
func TestCopyUpFailureLeavesNothing(t *testing.T) {
	root := t.TempDir()
	os.WriteFile(filepath.Join(root, "mid"), pattern(60<<10, 1), 0o644)
	before := digestTree(t, root)
	lower, _ := NewDirLower(root)
	defer lower.Close()
	setup := func(t *testing.T, opts memfs.Options, fill func(fs *FS) error) (*FS, *memfs.Layer, uint64) {
		l, err := memfs.New(t.TempDir()+"/upper", opts)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		fs, err := New(l, lower)
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(fs.Close)
		m, err := fs.Lookup(vfs.RootIno, "mid")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { fs.Forget(m.Ino(), 1) })
		for i := 0; ; i++ {
			if err := fill(fs); err != nil {
				break
			}
		}
		return fs, l, m.Ino()
	}
	intact := func(t *testing.T, fs *FS, ino uint64) {
		f, err := fs.Open(ino, unix.O_RDONLY, vfs.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		defer f.Release()
		buf := make([]byte, 70<<10)
		n, err := f.ReadAt(buf, 0)
		if err != nil || !bytes.Equal(buf[:n], pattern(60<<10, 1)) {
			t.Errorf("content after a failed copy-up: %d bytes %v", n, err)
		}
		var names []string
		d, _ := fs.upper.OpenDir(fs.workIno)
		d.ReadDir(0, func(e *vfs.DirEntry) bool {
			if e.Name != "." && e.Name != ".." && e.Name != whiteoutName {
				names = append(names, e.Name)
			}
			return true
		})
		d.Close()
		if len(names) != 0 {
			t.Errorf("work directory holds %q", names)
		}
		if err := fs.CheckInvariants(); err != nil {
			t.Error(err)
		}
	}
	t.Run("inodes", func(t *testing.T) {
		i := 0
		fs, l, ino := setup(t, memfs.Options{Size: 1 << 20, Inodes: 64}, func(fs *FS) error {
			i++
			e, err := fs.Mkdir(vfs.RootIno, fmt.Sprint("d", i), 0o755, vfs.Root)
			if err == nil {
				fs.Forget(e.Ino(), 1)
			}
			return err
		})
		if _, err := fs.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o600}); err != syscall.ENOSPC {
			t.Errorf("copy-up with no inode left: %v", err)
		}
		if _, err := l.Lookup(vfs.RootIno, "mid"); err != syscall.ENOENT {
			t.Errorf("half copy in the upper: %v", err)
		}
		if st, _ := fs.GetAttr(ino); st.Mode&0o777 != 0o644 {
			t.Errorf("mode %o after a failed chmod", st.Mode)
		}
		intact(t, fs, ino)
	})
	t.Run("bytes", func(t *testing.T) {
		var f vfs.File
		off := int64(0)
		fs, _, ino := setup(t, memfs.Options{Size: 1 << 20}, func(fs *FS) error {
			if f == nil {
				e, nf, err := fs.Create(vfs.RootIno, "fill", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
				if err != nil {
					return err
				}
				fs.Forget(e.Ino(), 1)
				f = nf
			}
			_, err := f.WriteAt(make([]byte, 64<<10), off, false)
			off += 64 << 10
			return err
		})
		f.Release()
		// The metadata copy fits, the bytes do not: the write open fails
		// and the file is as it was, partial in the upper.
		if _, err := fs.Open(ino, unix.O_RDWR, vfs.OpenOptions{}); err != syscall.ENOSPC {
			t.Errorf("copy-up into a full layer: %v", err)
		}
		intact(t, fs, ino)
	})
	if after := digestTree(t, root); after != before {
		t.Error("lower changed")
	}
}

// TestReaddirOffsetsStable reads a merged directory in steps while it
// changes: every entry that stays is seen exactly once, and offsets stay
// valid.
func TestReaddirOffsetsStable(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	a, err := fs.Lookup(vfs.RootIno, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(a.Ino(), 1)
	// Make it merged: an upper entry, a whiteout.
	if err := fs.Unlink(a.Ino(), "f1"); err != nil {
		t.Fatal(err)
	}
	e, err := fs.Mkdir(a.Ino(), "up", 0o755, vfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	fs.Forget(e.Ino(), 1)
	d, err := fs.OpenDir(a.Ino())
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	seen := map[string]int{}
	var off int64
	step := 0
	for {
		got := 0
		d.ReadDir(off, func(e *vfs.DirEntry) bool {
			seen[e.Name]++
			off = e.Off
			got++
			return got < 2
		})
		if got == 0 {
			break
		}
		// Change the directory between steps.
		name := fmt.Sprintf("n%d", step)
		e, err := fs.Mkdir(a.Ino(), name, 0o755, vfs.Root)
		if err != nil {
			t.Fatal(err)
		}
		fs.Forget(e.Ino(), 1)
		if step == 1 {
			fs.Unlink(a.Ino(), "link")
		}
		step++
	}
	for _, name := range []string{".", "..", "big", "escape", "hl", "sub", "up"} {
		if seen[name] != 1 {
			t.Errorf("%s seen %d times", name, seen[name])
		}
	}
	if seen["f1"] != 0 {
		t.Errorf("whiteout shown")
	}
	for name, n := range seen {
		if n > 1 {
			t.Errorf("%s seen %d times", name, n)
		}
	}
	// Rewinding sees the changes.
	seen = map[string]int{}
	d.ReadDir(0, func(e *vfs.DirEntry) bool { seen[e.Name]++; return true })
	if seen["n0"] != 1 || seen["link"] != 0 {
		t.Errorf("after rewind: %v", seen)
	}
}

// TestNoLower serves a pure memory volume: no lower at all.
func TestNoLower(t *testing.T) {
	fs, err := New(newLayer(t), nil)
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Close()
	st, err := fs.GetAttr(vfs.RootIno)
	if err != nil || st.Nlink != 2 {
		t.Fatalf("root: nlink %d %v", st.Nlink, err)
	}
	d, err := fs.Mkdir(vfs.RootIno, "d", 0o755, vfs.Root)
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(d.Ino(), 1)
	e, f, err := fs.Create(d.Ino(), "f", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{Direct: true})
	if err != nil {
		t.Fatal(err)
	}
	if !f.Direct() {
		t.Errorf("an upper file is not direct")
	}
	f.WriteAt([]byte("x"), 0, false)
	f.Release()
	fs.Forget(e.Ino(), 1)
	if err := fs.Rename(d.Ino(), "f", vfs.RootIno, "g", 0); err != nil {
		t.Fatal(err)
	}
	if err := fs.Unlink(vfs.RootIno, "g"); err != nil {
		t.Fatal(err)
	}
	if err := fs.Rmdir(vfs.RootIno, "d"); err != nil {
		t.Fatal(err)
	}
	ents, _ := overlayT(fs).readDir(vfs.RootIno)
	if len(ents) != 2 {
		t.Errorf("root holds %v", ents)
	}
	if err := fs.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
}

// TestPartialCopyUpBlocks checks that a partly copied-up file counts the
// blocks still in the lower: a chmod copies up the metadata alone, and its
// sparse upper copy has no blocks, but the file is not a hole (found
// comparing stat on the overlay with a tmpfs copy of its lower; tar
// --sparse takes st_blocks 0 for "all holes" and would archive zeros).
func TestPartialCopyUpBlocks(t *testing.T) {
	root := makeLower(t)
	fs := newOverlay(t, root)
	a, err := fs.Lookup(vfs.RootIno, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(a.Ino(), 1)
	for _, name := range []string{"f1", "big"} {
		var lst unix.Stat_t
		if err := unix.Lstat(filepath.Join(root, "a", name), &lst); err != nil {
			t.Fatal(err)
		}
		if lst.Blocks == 0 {
			t.Skipf("the host file system reports no blocks for %s", name)
		}
		e, err := fs.Lookup(a.Ino(), name)
		if err != nil {
			t.Fatal(err)
		}
		defer fs.Forget(e.Ino(), 1)
		st, err := fs.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o600})
		if err != nil {
			t.Fatal(err)
		}
		if got, want := st.Blocks, lst.Blocks; got != want {
			t.Errorf("%s after chmod: SetAttr blocks %d, want the lower's %d", name, got, want)
		}
		if st, err = fs.GetAttr(e.Ino()); err != nil || st.Blocks != lst.Blocks {
			t.Errorf("%s after chmod: GetAttr blocks %d (%v), want %d", name, st.Blocks, err, lst.Blocks)
		}
	}

	// Writing one page of a partial file moves that page's blocks up, and
	// the total stays the lower's.
	e, err := fs.Lookup(a.Ino(), "big")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(e.Ino(), 1)
	f, err := fs.Open(e.Ino(), unix.O_WRONLY, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("x"), 8192, false); err != nil {
		t.Fatal(err)
	}
	st, err := f.Stat()
	f.Release()
	var lst unix.Stat_t
	unix.Lstat(filepath.Join(root, "a", "big"), &lst)
	if err != nil || st.Blocks != lst.Blocks {
		t.Errorf("big after a one-page write: blocks %d (%v), want %d", st.Blocks, err, lst.Blocks)
	}
}

// TestDevices checks device nodes in both layers: one made in the upper,
// lower ones that show with their numbers, a metadata copy-up that makes a
// device with the same number, and renames, links and removals.
func TestDevices(t *testing.T) {
	fs := newOverlay(t, makeDevLower(t))
	lookup := func(parent uint64, name string) vfs.Entry {
		t.Helper()
		e, err := fs.Lookup(parent, name)
		if err != nil {
			t.Fatalf("lookup %s: %v", name, err)
		}
		t.Cleanup(func() { fs.Forget(e.Ino(), 1) })
		return e
	}
	check := func(what string, st unix.Stat_t, mode uint32, uid uint32, rdev uint64) {
		t.Helper()
		if st.Mode != mode || st.Uid != uid || st.Rdev != rdev {
			t.Errorf("%s: mode %o uid %d rdev %#x, want %o %d %#x", what, st.Mode, st.Uid, st.Rdev, mode, uid, rdev)
		}
	}

	udev := unix.Mkdev(8, 1)
	e, err := fs.Mknod(vfs.RootIno, "udev", unix.S_IFBLK|0o660, udev, vfs.Caller{Uid: 5, Gid: 6})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fs.Forget(e.Ino(), 1) })
	check("new upper device", e.Stat, unix.S_IFBLK|0o660, 5, udev)
	st, _ := fs.GetAttr(e.Ino())
	check("stat of the upper device", st, unix.S_IFBLK|0o660, 5, udev)
	if _, err := fs.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{}); err != syscall.EINVAL {
		t.Errorf("open of the upper device: %v, want EINVAL", err)
	}

	a := lookup(vfs.RootIno, "a")
	c := lookup(a.Ino(), "cdev")
	check("lower device", c.Stat, unix.S_IFCHR|0o640, 1000, lowerChr)
	if _, err := fs.Open(c.Ino(), unix.O_RDONLY, vfs.OpenOptions{}); err != syscall.EINVAL {
		t.Errorf("open of the lower device: %v, want EINVAL", err)
	}
	d, err := fs.OpenDir(a.Ino())
	if err != nil {
		t.Fatal(err)
	}
	d.ReadDir(0, func(de *vfs.DirEntry) bool {
		if de.Name == "cdev" && (de.Type != unix.DT_CHR || de.Ino != c.Ino()) {
			t.Errorf("readdir: cdev type %d ino %#x, want %d %#x", de.Type, de.Ino, unix.DT_CHR, c.Ino())
		}
		return true
	})
	d.Close()

	// chmod copies the metadata up: a device with the same number.
	st, err = fs.SetAttr(c.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o604})
	if err != nil {
		t.Fatalf("chmod of the lower device: %v", err)
	}
	check("after chmod", st, unix.S_IFCHR|0o604, 1000, lowerChr)
	if st.Gid != 1001 || st.Ino != c.Ino() || st.Mtim.Nano() != oldTime.UnixNano() {
		t.Errorf("after chmod: gid %d ino %#x mtime %d, want 1001 %#x %d", st.Gid, st.Ino, st.Mtim.Nano(), c.Ino(), oldTime.UnixNano())
	}
	ua, err := fs.upper.Lookup(vfs.RootIno, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.upper.Forget(ua.Ino(), 1)
	uc, err := fs.upper.Lookup(ua.Ino(), "cdev")
	if err != nil {
		t.Fatalf("no upper copy: %v", err)
	}
	fs.upper.Forget(uc.Ino(), 1)
	check("upper copy", uc.Stat, unix.S_IFCHR|0o604, 1000, lowerChr)

	// A lower device renamed, linked and removed.
	if err := fs.Rename(vfs.RootIno, "bdev", a.Ino(), "bdev2", 0); err != nil {
		t.Fatalf("rename of the lower device: %v", err)
	}
	if _, err := fs.Lookup(vfs.RootIno, "bdev"); err != syscall.ENOENT {
		t.Errorf("old name after rename: %v, want ENOENT", err)
	}
	b := lookup(a.Ino(), "bdev2")
	check("renamed", b.Stat, unix.S_IFBLK|0o600, 0, lowerBlk)
	l, err := fs.Link(b.Ino(), vfs.RootIno, "bdev3")
	if err != nil {
		t.Fatalf("link: %v", err)
	}
	fs.Forget(l.Ino(), 1)
	if l.Ino() != b.Ino() || l.Stat.Nlink != 2 || l.Stat.Rdev != lowerBlk {
		t.Errorf("link: ino %#x nlink %d rdev %#x", l.Ino(), l.Stat.Nlink, l.Stat.Rdev)
	}
	for _, rm := range []struct {
		dir  uint64
		name string
	}{{a.Ino(), "bdev2"}, {vfs.RootIno, "bdev3"}, {a.Ino(), "cdev"}} {
		if err := fs.Unlink(rm.dir, rm.name); err != nil {
			t.Errorf("unlink %s: %v", rm.name, err)
		}
		if _, err := fs.Lookup(rm.dir, rm.name); err != syscall.ENOENT {
			t.Errorf("%s after unlink: %v, want ENOENT", rm.name, err)
		}
	}
}

// TestDirLowerOpenRefusesDevices checks that DirLower.Open never opens a
// device: the lower tree need not be mounted nodev, and opening a device
// may act on it. The major number has no driver, so an open would fail
// with ENXIO rather than EINVAL.
func TestDirLowerOpenRefusesDevices(t *testing.T) {
	root := t.TempDir()
	if err := unix.Mknod(filepath.Join(root, "dev"), unix.S_IFCHR|0o666, int(unix.Mkdev(4095, 0))); err != nil {
		t.Fatal(err)
	}
	l, err := NewDirLower(root)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	if f, err := l.Open("dev"); err != syscall.EINVAL {
		if err == nil {
			f.Close()
		}
		t.Errorf("Open of a device: %v, want EINVAL", err)
	}
}

// TestSeekAfterOtherCopyUp checks lseek on a read-only File opened while
// its big file was only in the lower, after another open copied the file
// up in part: the File has no upper file of its own yet.
func TestSeekAfterOtherCopyUp(t *testing.T) {
	fs := newOverlay(t, makeLower(t))
	a, err := fs.Lookup(vfs.RootIno, "a")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(a.Ino(), 1)
	e, err := fs.Lookup(a.Ino(), "big")
	if err != nil {
		t.Fatal(err)
	}
	defer fs.Forget(e.Ino(), 1)
	for _, direct := range []bool{false, true} {
		r, err := fs.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{Direct: direct})
		if err != nil {
			t.Fatal(err)
		}
		w, err := fs.Open(e.Ino(), unix.O_WRONLY, vfs.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		if _, err := w.WriteAt([]byte("x"), 8192, false); err != nil {
			t.Fatal(err)
		}
		for _, c := range []struct {
			whence    int
			off, want int64
		}{
			{unix.SEEK_DATA, 4096, 4096},
			{unix.SEEK_HOLE, 0, bigSize},
		} {
			if got, err := r.Seek(c.off, c.whence); err != nil || got != c.want {
				t.Errorf("direct %v: seek(%d, %d) = %d, %v; want %d", direct, c.off, c.whence, got, err, c.want)
			}
		}
		w.Release()
		r.Release()
	}
}
