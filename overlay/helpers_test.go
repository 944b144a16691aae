package overlay

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// oldTime is the modification time of every lower entry; anything the
// tests change gets a time after testStart.
var oldTime = time.Date(2020, 1, 2, 3, 4, 5, 600, time.UTC)

// bigSize is the size of the lower files too big to copy up at once.
const bigSize = 300 << 10

// pattern returns n bytes that differ at every offset's page and byte.
func pattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i) ^ byte(i>>12) ^ seed
	}
	return b
}

// makeLower builds the lower tree the tests use and returns its root.
func makeLower(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(s string) string { return filepath.Join(root, s) }
	for _, d := range []string{"a", "a/sub", "a/sub/deep", "b", "c", "e", "e/f"} {
		must(os.Mkdir(p(d), 0o755))
	}
	must(os.WriteFile(p("a/f1"), []byte("hello a/f1\n"), 0o644))
	must(os.WriteFile(p("a/big"), pattern(bigSize, 1), 0o640))
	must(os.WriteFile(p("a/sub/g"), []byte("g"), 0o600))
	must(os.WriteFile(p("a/sub/deep/x"), []byte("x"), 0o644))
	must(os.WriteFile(p("e/f/y"), pattern(5000, 3), 0o644))
	must(os.Symlink("f1", p("a/link")))
	must(os.Symlink("../../etc/passwd", p("a/escape")))
	must(os.WriteFile(p("a/hl"), pattern(bigSize+1000, 2), 0o644)) // not 0o664: the process umask (memfs zeroes it) must not matter
	must(os.Link(p("a/hl"), p("b/hl")))
	must(os.WriteFile(p("top"), []byte("top file"), 0o4755))
	must(os.WriteFile(p("empty"), nil, 0o644))
	must(unix.Mkfifo(p("fifo"), 0o644))
	must(os.Chmod(p("b"), 0o2770))
	must(os.Lchown(p("b"), 1000, 1000))
	must(os.Lchown(p("a/big"), 1000, 1001))
	must(os.Lchown(p("a/link"), 1000, 1000))
	must(unix.Lsetxattr(p("a/f1"), "user.test", []byte("v1"), 0))
	must(unix.Lsetxattr(p("a"), "user.dir", []byte("d"), 0))
	must(unix.Lsetxattr(p("a/big"), "user.big", []byte("big"), 0))
	must(unix.Lsetxattr(p(""), "user.root", []byte("r"), 0))
	// Times last, children before parents.
	var paths []string
	filepath.Walk(root, func(path string, _ os.FileInfo, _ error) error {
		paths = append(paths, path)
		return nil
	})
	sort.Sort(sort.Reverse(sort.StringSlice(paths)))
	ts := []unix.Timespec{unix.NsecToTimespec(oldTime.UnixNano()), unix.NsecToTimespec(oldTime.UnixNano())}
	for _, path := range paths {
		must(unix.UtimesNanoAt(unix.AT_FDCWD, path, ts, unix.AT_SYMLINK_NOFOLLOW))
	}
	return root
}

// Device numbers of the lower device nodes makeDevLower adds.
var (
	lowerChr = unix.Mkdev(1, 3)
	lowerBlk = unix.Mkdev(7, 1)
)

// makeDevLower is makeLower with device nodes: the character device a/cdev
// (lowerChr, 0640, owned by 1000:1001) and the block device bdev
// (lowerBlk, 0600).
func makeDevLower(t testing.TB) string {
	t.Helper()
	root := makeLower(t)
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	p := func(s string) string { return filepath.Join(root, s) }
	must(unix.Mknod(p("a/cdev"), unix.S_IFCHR|0o640, int(lowerChr)))
	must(os.Lchown(p("a/cdev"), 1000, 1001))
	must(unix.Mknod(p("bdev"), unix.S_IFBLK|0o600, int(lowerBlk)))
	ts := []unix.Timespec{unix.NsecToTimespec(oldTime.UnixNano()), unix.NsecToTimespec(oldTime.UnixNano())}
	for _, path := range []string{"a/cdev", "bdev", "a", ""} {
		must(unix.UtimesNanoAt(unix.AT_FDCWD, p(path), ts, unix.AT_SYMLINK_NOFOLLOW))
	}
	return root
}

// digestTree describes every byte and attribute of a host tree (except
// access and change times) for comparing before and after a test.
func digestTree(t testing.TB, root string) string {
	t.Helper()
	var b strings.Builder
	err := filepath.Walk(root, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		var st unix.Stat_t
		if err := unix.Lstat(path, &st); err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		fmt.Fprintf(&b, "%s ino=%d mode=%o uid=%d gid=%d nlink=%d size=%d rdev=%d mtime=%d", rel, st.Ino, st.Mode, st.Uid, st.Gid, st.Nlink, st.Size, st.Rdev, st.Mtim.Nano())
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			sum, err := hashData(path)
			if err != nil {
				return err
			}
			fmt.Fprintf(&b, " sha=%s", sum)
		case unix.S_IFLNK:
			target, _ := os.Readlink(path)
			fmt.Fprintf(&b, " ->%s", target)
		}
		buf := make([]byte, 4096)
		if n, err := unix.Llistxattr(path, buf); err == nil {
			names := strings.Split(string(buf[:n]), "\x00")
			sort.Strings(names)
			for _, name := range names {
				if name == "" {
					continue
				}
				v := make([]byte, 4096)
				vn, _ := unix.Lgetxattr(path, name, v)
				fmt.Fprintf(&b, " %s=%q", name, v[:max(vn, 0)])
			}
		}
		b.WriteByte('\n')
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return b.String()
}

// hashData hashes a file's data extents with their offsets (holes are
// skipped, so huge sparse files hash fast).
func hashData(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	fd := int(f.Fd())
	buf := make([]byte, 1<<20)
	for off := int64(0); ; {
		data, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err != nil {
			break // ENXIO: no more data
		}
		hole, err := unix.Seek(fd, data, unix.SEEK_HOLE)
		if err != nil {
			return "", err
		}
		fmt.Fprintf(h, "@%d:", data)
		for pos := data; pos < hole; {
			n, err := unix.Pread(fd, buf[:min(int64(len(buf)), hole-pos)], pos)
			if err != nil || n == 0 {
				return "", fmt.Errorf("read %s: %v", path, err)
			}
			h.Write(buf[:n])
			pos += int64(n)
		}
		off = hole
	}
	return hex.EncodeToString(h.Sum(nil)[:8]), nil
}

// newLayer mounts a fresh memfs layer for a test.
func newLayer(t testing.TB) *memfs.Layer {
	t.Helper()
	l, err := memfs.New(t.TempDir()+"/upper", memfs.Options{Size: 64 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

// newOverlay returns an overlay over the host tree lowerDir, and checks at
// cleanup that the lower tree is unchanged and that the FS's invariants
// hold.
func newOverlay(t testing.TB, lowerDir string) *FS {
	t.Helper()
	before := digestTree(t, lowerDir)
	lower, err := NewDirLower(lowerDir)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := New(newLayer(t), lower)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.CheckInvariants(); err != nil {
			t.Errorf("invariants: %v", err)
		}
		fs.Close()
		lower.Close()
		if after := digestTree(t, lowerDir); after != before {
			t.Errorf("lower tree changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
	})
	return fs
}

// copyToLayer copies the host tree root into the memfs layer l as a user of
// a plain directory would see it: the oracle.
func copyToLayer(t testing.TB, root string, l *memfs.Layer) {
	t.Helper()
	links := map[uint64]uint64{} // host ino -> layer ino
	var walk func(host string, dir uint64)
	setMeta := func(host string, ino uint64, st *unix.Stat_t) {
		buf := make([]byte, 4096)
		if n, err := unix.Llistxattr(host, buf); err == nil {
			for _, name := range strings.Split(string(buf[:n]), "\x00") {
				if name == "" {
					continue
				}
				v := make([]byte, 4096)
				vn, err := unix.Lgetxattr(host, name, v)
				if err != nil {
					t.Fatal(err)
				}
				if err := l.SetXattr(ino, name, v[:vn], 0); err != nil {
					t.Fatal(err)
				}
			}
		}
		a := vfs.SetAttr{Valid: vfs.SetUid | vfs.SetGid | vfs.SetAtime | vfs.SetMtime, Uid: st.Uid, Gid: st.Gid, Atime: st.Atim, Mtime: st.Mtim}
		if st.Mode&unix.S_IFMT != unix.S_IFLNK {
			a.Valid |= vfs.SetMode
			a.Mode = st.Mode & 07777
		}
		if _, err := l.SetAttr(ino, nil, a); err != nil {
			t.Fatalf("setattr %s: %v", host, err)
		}
	}
	walk = func(host string, dir uint64) {
		ents, err := os.ReadDir(host)
		if err != nil {
			t.Fatal(err)
		}
		for _, de := range ents {
			path := filepath.Join(host, de.Name())
			var st unix.Stat_t
			if err := unix.Lstat(path, &st); err != nil {
				t.Fatal(err)
			}
			var e vfs.Entry
			switch st.Mode & unix.S_IFMT {
			case unix.S_IFDIR:
				e, err = l.Mkdir(dir, de.Name(), 0o700, vfs.Root)
				if err == nil {
					walk(path, e.Ino())
				}
			case unix.S_IFREG:
				if ino, ok := links[st.Ino]; ok {
					e, err = l.Link(ino, dir, de.Name())
					if err == nil {
						l.Forget(e.Ino(), 1)
					}
					continue
				}
				var f vfs.File
				e, f, err = l.Create(dir, de.Name(), unix.O_RDWR|unix.O_EXCL, 0o600, vfs.Root, vfs.OpenOptions{})
				if err == nil {
					data, _ := os.ReadFile(path)
					_, err = f.WriteAt(data, 0, false)
					f.Release()
				}
				links[st.Ino] = e.Ino()
			case unix.S_IFLNK:
				target, _ := os.Readlink(path)
				e, err = l.Symlink(dir, de.Name(), target, vfs.Root)
			default:
				e, err = l.Mknod(dir, de.Name(), st.Mode, st.Rdev, vfs.Root)
			}
			if err != nil {
				t.Fatalf("copy %s: %v", path, err)
			}
			setMeta(path, e.Ino(), &st)
			if _, ok := links[st.Ino]; !ok || st.Mode&unix.S_IFMT != unix.S_IFREG {
				l.Forget(e.Ino(), 1)
			}
		}
		var st unix.Stat_t
		unix.Lstat(host, &st)
		setMeta(host, dir, &st)
	}
	walk(root, vfs.RootIno)
}

// errStr names an error for comparisons.
func errStr(err error) string {
	if err == nil {
		return "ok"
	}
	if e, ok := err.(syscall.Errno); ok {
		return unix.ErrnoName(e)
	}
	return err.Error()
}
