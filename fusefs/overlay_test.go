package fusefs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"

	"github.com/hanwen/go-fuse/v2/posixtest"
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/overlay"
)

// makeOverlayLower builds a populated lower tree with an empty directory
// "t" for posixtest to work in.
func makeOverlayLower(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"t", "a", "a/sub"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, data := range map[string]string{
		"a/f":     "lower file\n",
		"a/sub/g": strings.Repeat("0123456789abcdef", 40000),
		"top":     "top\n",
	} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Link(filepath.Join(root, "a/f"), filepath.Join(root, "a/f2")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink("f", filepath.Join(root, "a/link")); err != nil {
		t.Fatal(err)
	}
	return root
}

// snapshotTree describes every file's bytes and attributes but times.
func snapshotTree(t testing.TB, root string) string {
	t.Helper()
	var b bytes.Buffer
	filepath.Walk(root, func(path string, fi os.FileInfo, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		b.WriteString(path + " " + fi.Mode().String())
		if fi.Mode().IsRegular() {
			data, _ := os.ReadFile(path)
			b.Write(data)
		}
		b.WriteByte('\n')
		return nil
	})
	return b.String()
}

// testOverlayMount mounts an overlay of a fresh memory layer over lower.
func testOverlayMount(t testing.TB, lower string, opts Options) (string, *overlay.FS) {
	t.Helper()
	mnt, fs, _ := testOverlayMountFull(t, lower, opts)
	return mnt, fs
}

// testOverlayMountServer is testOverlayMount returning the Server.
func testOverlayMountServer(t testing.TB, lower string, opts Options) (string, *Server) {
	t.Helper()
	mnt, _, srv := testOverlayMountFull(t, lower, opts)
	return mnt, srv
}

func testOverlayMountFull(t testing.TB, lower string, opts Options) (string, *overlay.FS, *Server) {
	t.Helper()
	base, l := newTestLayer(t, 256<<20)
	dl, err := overlay.NewDirLower(lower)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := overlay.New(l, dl)
	if err != nil {
		dl.Close()
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.CheckInvariants(); err != nil {
			t.Errorf("invariants after unmount: %v", err)
		}
		fs.Close()
		dl.Close()
	})
	mnt, srv := mountTest(t, base, fs, opts)
	return mnt, fs, srv
}

func runOverlayPosix(t *testing.T, opts Options) {
	lower := makeOverlayLower(t)
	before := snapshotTree(t, lower)
	eachPosix(t, func(t *testing.T) string {
		mnt, _ := testOverlayMount(t, lower, opts)
		return filepath.Join(mnt, "t")
	})
	if after := snapshotTree(t, lower); after != before {
		t.Errorf("the lower tree changed")
	}
}

func TestOverlayPosixPassthrough(t *testing.T) { runOverlayPosix(t, Options{}) }

func TestOverlayPosixDaemonIO(t *testing.T) { runOverlayPosix(t, Options{DisablePassthrough: true}) }

// TestOverlayDevices checks device nodes of an overlay through a real
// mount: a lower one shows with its number and stays inert, a chmod copies
// it up as a device with the same number, and a new one goes in the upper.
func TestOverlayDevices(t *testing.T) {
	lower := makeOverlayLower(t)
	null := unix.Mkdev(1, 3)
	if err := unix.Mknod(filepath.Join(lower, "a/null"), unix.S_IFCHR, int(null)); err != nil {
		t.Fatal(err)
	}
	if err := os.Chmod(filepath.Join(lower, "a/null"), 0o666); err != nil {
		t.Fatal(err)
	}
	before := snapshotTree(t, lower)
	mnt, _ := testOverlayMount(t, lower, Options{})
	p := func(s string) string { return filepath.Join(mnt, s) }

	checkInertDevice(t, p("a/null"), unix.S_IFCHR|0o666, null)
	if err := os.Chmod(p("a/null"), 0o640); err != nil {
		t.Fatalf("chmod of the lower device: %v", err)
	}
	checkInertDevice(t, p("a/null"), unix.S_IFCHR|0o640, null)
	if err := os.Rename(p("a/null"), p("t/null")); err != nil {
		t.Fatalf("rename: %v", err)
	}
	checkInertDevice(t, p("t/null"), unix.S_IFCHR|0o640, null)

	loop := unix.Mkdev(7, 0)
	if err := unix.Mknod(p("a/sub/loop"), unix.S_IFBLK|0o600, int(loop)); err != nil {
		t.Fatalf("mknod in a lower directory: %v", err)
	}
	checkInertDevice(t, p("a/sub/loop"), unix.S_IFBLK|0o600, loop)
	for _, name := range []string{"t/null", "a/sub/loop"} {
		if err := os.Remove(p(name)); err != nil {
			t.Errorf("remove %s: %v", name, err)
		}
	}
	if after := snapshotTree(t, lower); after != before {
		t.Errorf("the lower tree changed")
	}
}

// TestOverlayLowerFiles reads, writes and renames lower entries through a
// real mount.
func TestOverlayLowerFiles(t *testing.T) {
	lower := makeOverlayLower(t)
	before := snapshotTree(t, lower)
	mnt, fs := testOverlayMount(t, lower, Options{})
	p := func(s string) string { return filepath.Join(mnt, s) }

	got, err := os.ReadFile(p("a/sub/g"))
	if err != nil || string(got) != strings.Repeat("0123456789abcdef", 40000) {
		t.Fatalf("read lower file: %v", err)
	}
	f, err := os.OpenFile(p("a/sub/g"), os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write([]byte("!")); err != nil {
		t.Fatal(err)
	}
	f.Close()
	got, _ = os.ReadFile(p("a/sub/g"))
	if want := strings.Repeat("0123456789abcdef", 40000) + "!"; string(got) != want {
		t.Fatalf("after append: %d bytes, want %d", len(got), len(want))
	}
	if u, _ := fs.Usage(); u.CopiedUpBytes > 8192 {
		t.Errorf("appending a byte copied up %d bytes", u.CopiedUpBytes)
	}
	if err := os.Rename(p("a"), p("moved")); err != nil {
		t.Fatalf("rename lower dir: %v", err)
	}
	if got, err := os.ReadFile(p("moved/f2")); err != nil || string(got) != "lower file\n" {
		t.Fatalf("read in renamed dir: %q %v", got, err)
	}
	var st1, st2 unix.Stat_t
	if err := unix.Lstat(p("moved/f"), &st1); err != nil {
		t.Fatal(err)
	}
	if err := unix.Lstat(p("moved/f2"), &st2); err != nil {
		t.Fatal(err)
	}
	if st1.Ino != st2.Ino || st1.Nlink != 2 {
		t.Errorf("hard links: inodes %d %d, nlink %d", st1.Ino, st2.Ino, st1.Nlink)
	}
	if _, err := os.Stat(p("a")); !os.IsNotExist(err) {
		t.Errorf("old name after rename: %v", err)
	}
	if after := snapshotTree(t, lower); after != before {
		t.Errorf("the lower tree changed")
	}
}

// rootSkips are the cases that expect to start in an empty directory.
var rootSkips = map[string]string{
	"ReadDirBasic": "expects an empty directory; the root shows the lower's entries",
	"Tmpfile":      "expects an empty directory; the root shows the lower's entries",
}

// TestOverlayPosixRoot runs the suite in the mount's root, beside the
// lower's entries (the suite's own names do not collide with them).
func TestOverlayPosixRoot(t *testing.T) {
	lower := makeOverlayLower(t)
	for name, fn := range posixtest.All {
		t.Run(name, func(t *testing.T) {
			if why, ok := posixSkips[name]; ok {
				t.Skip(why)
			}
			if why, ok := rootSkips[name]; ok {
				t.Skip(why)
			}
			mnt, _ := testOverlayMount(t, lower, Options{})
			fn(t, mnt)
		})
	}
}

// TestOverlayWriteBesideLowerReader: a reader of a lower file holds the
// lower file as the inode's passthrough backing, so a writer (whose bytes
// must go to an upper copy) gets ETXTBSY until the reader closes; then the
// write works, readers see it, and the lower is untouched.
func TestOverlayWriteBesideLowerReader(t *testing.T) {
	lower := t.TempDir()
	if err := os.WriteFile(filepath.Join(lower, "log"), []byte("from the image\n"), 0o666); err != nil {
		t.Fatal(err)
	}
	before := snapshotTree(t, lower)
	mnt, _ := testOverlayMount(t, lower, Options{})
	p := filepath.Join(mnt, "log")
	r, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0); !errors.Is(err, syscall.ETXTBSY) {
		t.Errorf("writer beside a lower reader: %v, want ETXTBSY", err)
	}
	r.Close()
	w, err := os.OpenFile(p, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatalf("writer after the reader closed: %v", err)
	}
	w.WriteString("appended\n")
	w.Close()
	if got, _ := os.ReadFile(p); string(got) != "from the image\nappended\n" {
		t.Errorf("read back %q", got)
	}
	if after := snapshotTree(t, lower); after != before {
		t.Error("the lower tree changed")
	}
}
