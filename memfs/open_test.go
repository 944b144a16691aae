package memfs

import (
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// openLayer opens the instance on dir; cleanup checks the Layer's
// invariants and closes it, which unmounts the instance.
func openLayer(t *testing.T, dir string, opts Options) *Layer {
	t.Helper()
	l, err := Open(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	closeAtCleanup(t, l)
	return l
}

// newInstance makes a Layer on a fresh instance, for a test that opens the
// instance again as a successor process does; the caller detaches it.
func newInstance(t *testing.T, opts Options) (string, *Layer) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	dir := filepath.Join(t.TempDir(), "upper")
	l, err := New(dir, opts)
	if err != nil {
		t.Fatal(err)
	}
	return dir, l
}

func TestOpenServesExistingInstance(t *testing.T) {
	opts := Options{Size: 4 << 20}
	dir, old := newInstance(t, opts)
	data := bytes.Repeat([]byte("open"), 3000)
	d := must[vfs.Entry](t)(old.Mkdir(vfs.RootIno, "d", 0o750, vfs.Caller{Uid: 1000, Gid: 1000}))
	e, f, err := old.Create(d.Ino(), "f", unix.O_RDWR, 0o640, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	must[int](t)(f.WriteAt(data, 0, false))
	f.Release()
	must[struct{}](t)(struct{}{}, old.AddSeals(e.Ino(), SealGrow|SealShrink))
	must[struct{}](t)(struct{}{}, old.SetXattr(e.Ino(), "user.k", []byte("v"), 0))
	must[struct{}](t)(struct{}{}, old.SetMarker(d.Ino(), "m", []byte("mark"), 0))
	must[vfs.Entry](t)(old.Symlink(vfs.RootIno, "s", "d/f", vfs.Root))
	wantStat := must[unix.Statfs_t](t)(old.StatFS())
	old.Detach()

	l := openLayer(t, dir, opts)
	if got := must[vfs.Entry](t)(l.Lookup(vfs.RootIno, "d")); got.Ino() != d.Ino() || got.Gen != d.Gen || got.Stat.Uid != 1000 || got.Stat.Mode != unix.S_IFDIR|0o750 {
		t.Errorf("lookup d = ino %d gen %d uid %d mode %o, want ino %d gen %d uid 1000 mode %o",
			got.Ino(), got.Gen, got.Stat.Uid, got.Stat.Mode, d.Ino(), d.Gen, unix.S_IFDIR|0o750)
	}
	fe := must[vfs.Entry](t)(l.Lookup(d.Ino(), "f"))
	if fe.Ino() != e.Ino() || fe.Gen != e.Gen {
		t.Errorf("lookup d/f = ino %d gen %d, want %d %d", fe.Ino(), fe.Gen, e.Ino(), e.Gen)
	}
	if st := must[unix.Stat_t](t)(l.GetAttr(e.Ino())); st.Size != int64(len(data)) || st.Mode != unix.S_IFREG|0o640 {
		t.Errorf("getattr d/f: size %d mode %o", st.Size, st.Mode)
	}
	r := must[vfs.File](t)(l.Open(e.Ino(), unix.O_RDWR, vfs.OpenOptions{}))
	got := make([]byte, len(data)+10)
	if n := must[int](t)(r.ReadAt(got, 0)); !bytes.Equal(got[:n], data) {
		t.Errorf("read %d bytes that differ from the %d written", n, len(data))
	}
	_, err = r.WriteAt([]byte("x"), int64(len(data))+4096, false)
	wantErr(t, "grow a grow-sealed file", err, syscall.EPERM)
	r.Release()
	if s := must[Seals](t)(l.Seals(e.Ino())); s != SealGrow|SealShrink {
		t.Errorf("seals = %v, want grow,shrink", s)
	}
	buf := make([]byte, 16)
	if n := must[int](t)(l.GetXattr(e.Ino(), "user.k", buf)); string(buf[:n]) != "v" {
		t.Errorf("xattr = %q", buf[:n])
	}
	if n := must[int](t)(l.GetMarker(d.Ino(), "m", buf)); string(buf[:n]) != "mark" {
		t.Errorf("marker = %q", buf[:n])
	}
	se := must[vfs.Entry](t)(l.Lookup(vfs.RootIno, "s"))
	if target := must[string](t)(l.Readlink(se.Ino())); target != "d/f" {
		t.Errorf("readlink = %q", target)
	}
	if st := must[unix.Statfs_t](t)(l.StatFS()); st.Blocks != wantStat.Blocks || st.Files != wantStat.Files || st.Bfree != wantStat.Bfree {
		t.Errorf("statfs after open = %+v, want %+v", st, wantStat)
	}
	must[struct{}](t)(struct{}{}, l.Resize(8<<20, 0))
	if u := must[Usage](t)(l.Usage()); u.BytesLimit != 8<<20 {
		t.Errorf("after resize: limit %d, want %d", u.BytesLimit, 8<<20)
	}
	l.Forget(d.Ino(), 1)
	l.Forget(e.Ino(), 1)
	l.Forget(se.Ino(), 1)
}

func TestOpenRefuses(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	opts := Options{Size: 1 << 20}
	mount := func(t *testing.T, dir string, flags uintptr) {
		t.Helper()
		if err := os.MkdirAll(dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if err := unix.Mount("memfs-test", dir, "tmpfs", flags, "size=1m"); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { unix.Unmount(dir, unix.MNT_DETACH) })
	}
	for _, tc := range []struct {
		name string
		dir  func(t *testing.T) string
	}{
		{"plain empty directory", func(t *testing.T) string { return t.TempDir() }},
		{"non-empty directory", func(t *testing.T) string {
			dir := t.TempDir()
			os.WriteFile(filepath.Join(dir, "f"), []byte("f"), 0o644)
			os.Mkdir(filepath.Join(dir, "d"), 0o755)
			return dir
		}},
		{"directory inside an instance", func(t *testing.T) string {
			dir := filepath.Join(t.TempDir(), "i")
			mount(t, dir, mountFlags)
			os.Mkdir(filepath.Join(dir, "sub"), 0o755)
			return filepath.Join(dir, "sub")
		}},
		{"bind mount of a directory inside an instance", func(t *testing.T) string {
			base := t.TempDir()
			dir, bind := filepath.Join(base, "i"), filepath.Join(base, "bind")
			mount(t, dir, mountFlags)
			os.Mkdir(filepath.Join(dir, "sub"), 0o755)
			os.Mkdir(bind, 0o755)
			if err := unix.Mount(filepath.Join(dir, "sub"), bind, "", unix.MS_BIND, ""); err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { unix.Unmount(bind, unix.MNT_DETACH) })
			return bind
		}},
		{"tmpfs without nosuid,nodev", func(t *testing.T) string {
			dir := filepath.Join(t.TempDir(), "i")
			mount(t, dir, 0)
			return dir
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := tc.dir(t)
			l, err := Open(dir, opts)
			if err == nil {
				l.Close()
				t.Fatalf("Open(%s) served it", dir)
			}
			if !errors.Is(err, ErrNotInstance) {
				t.Errorf("Open(%s) = %v, want ErrNotInstance", dir, err)
			}
			t.Log(err)
		})
	}
	t.Run("missing directory", func(t *testing.T) {
		_, err := Open(filepath.Join(t.TempDir(), "none"), opts)
		if !errors.Is(err, os.ErrNotExist) {
			t.Errorf("Open of a missing directory = %v, want ENOENT", err)
		}
	})
	t.Run("bad size", func(t *testing.T) {
		if _, err := Open(t.TempDir(), Options{}); err == nil {
			t.Error("Open with size 0 succeeded")
		}
	})
}

// TestLookupHandle: a successor Layer finds a file that has no name (removed
// while open, or an O_TMPFILE) by its inode number and generation while
// something keeps it open, and answers ESTALE once nothing does or when
// the generation is wrong.
func TestLookupHandle(t *testing.T) {
	opts := Options{Size: 4 << 20}
	dir, old := newInstance(t, opts)
	defer old.Detach()
	e, removed, err := old.Create(vfs.RootIno, "f", unix.O_RDWR, 0o600, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	must[int](t)(removed.WriteAt([]byte("removed"), 0, false))
	must[struct{}](t)(struct{}{}, old.Unlink(vfs.RootIno, "f"))
	old.Forget(e.Ino(), 1)
	te, tmp, err := old.Tmpfile(vfs.RootIno, unix.O_RDWR, 0o600, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	must[int](t)(tmp.WriteAt([]byte("tmpfile"), 0, false))
	old.Forget(te.Ino(), 1)
	if ino, gen, _ := removed.(*File).Handle(); ino != e.Ino() || gen != e.Gen {
		t.Errorf("File.Handle %d %d, Entry %d %d", ino, gen, e.Ino(), e.Gen)
	}

	l := openLayer(t, dir, opts)
	for _, c := range []struct {
		e    vfs.Entry
		f    vfs.File
		want string
	}{{e, removed, "removed"}, {te, tmp, "tmpfile"}} {
		_, err := l.LookupHandle(c.e.Ino(), c.e.Gen+1)
		wantErr(t, c.want+": wrong generation", err, syscall.ESTALE)
		got := must[vfs.Entry](t)(l.LookupHandle(c.e.Ino(), c.e.Gen))
		if got.Ino() != c.e.Ino() || got.Gen != c.e.Gen || got.Stat.Nlink != 0 {
			t.Errorf("%s: ino %d gen %d nlink %d, want %d %d 0", c.want, got.Ino(), got.Gen, got.Stat.Nlink, c.e.Ino(), c.e.Gen)
		}
		r := must[vfs.File](t)(l.Open(c.e.Ino(), unix.O_RDWR, vfs.OpenOptions{}))
		buf := make([]byte, 16)
		if n, _ := r.ReadAt(buf, 0); string(buf[:n]) != c.want {
			t.Errorf("read %q, want %q", buf[:n], c.want)
		}
		if l.Refs(c.e.Ino()) != 2 {
			t.Errorf("%s: %d references, want 2 (the lookup and the File)", c.want, l.Refs(c.e.Ino()))
		}
		r.Release()
		l.Forget(c.e.Ino(), 1)
		// Once nobody holds it, the inode is gone.
		c.f.Release()
		_, err = l.LookupHandle(c.e.Ino(), c.e.Gen)
		wantErr(t, c.want+": after the last close", err, syscall.ESTALE)
	}
}
