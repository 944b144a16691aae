package memfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

func newLayer(t testing.TB, size int64) *Layer {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
	l, err := New(filepath.Join(t.TempDir(), "upper"), Options{Size: size})
	if err != nil {
		t.Fatal(err)
	}
	closeAtCleanup(t, l)
	return l
}

// closeAtCleanup checks l's invariants and closes it, which unmounts the
// instance, when t ends.
func closeAtCleanup(t testing.TB, l *Layer) {
	t.Cleanup(func() {
		if err := l.CheckInvariants(); err != nil {
			t.Errorf("invariants: %v", err)
		}
		if err := l.Close(); err != nil {
			t.Errorf("close: %v", err)
		}
	})
}

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

func wantErr(t testing.TB, what string, got, want error) {
	t.Helper()
	if !errors.Is(got, want) || (want == nil) != (got == nil) {
		t.Errorf("%s: got %v, want %v", what, got, want)
	}
}

func TestCheckName(t *testing.T) {
	long := string(bytes.Repeat([]byte("x"), 256))
	for _, tc := range []struct {
		name string
		want error
	}{
		{"a", nil},
		{"with space", nil},
		{".hidden", nil},
		{"...", nil},
		{long[:255], nil},
		{"", syscall.ENOENT},
		{".", syscall.EINVAL},
		{"..", syscall.EINVAL},
		{"a/b", syscall.EINVAL},
		{"/", syscall.EINVAL},
		{"nul\x00byte", syscall.EINVAL},
		{long, syscall.ENAMETOOLONG},
	} {
		got := CheckName(tc.name)
		if got != tc.want && !errors.Is(got, tc.want) {
			t.Errorf("CheckName(%q) = %v, want %v", tc.name, got, tc.want)
		}
	}
}

func TestNewRefusesBadInput(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := New(t.TempDir(), Options{}); err == nil {
		t.Error("New with size 0 succeeded")
	}
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "x"), nil, 0o644)
	if _, err := New(dir, Options{Size: 1 << 20}); err == nil {
		t.Error("New on a non-empty directory succeeded")
	}
}

// TestEscapes plays a hostile pod: symlinks to the host, "..", names with
// slashes, directories swapped under an operation. Nothing outside the
// volume may change.
func TestEscapes(t *testing.T) {
	l := newLayer(t, 16<<20)
	outside := t.TempDir()
	if err := os.WriteFile(filepath.Join(outside, "secret"), []byte("host"), 0o600); err != nil {
		t.Fatal(err)
	}
	before := snapshot(t, outside)

	c := vfs.Caller{Uid: 1000, Gid: 1000}
	for _, target := range []string{"/", outside, "..", "../..", "/proc/self/root", filepath.Join(outside, "secret")} {
		e := must[vfs.Entry](t)(l.Symlink(vfs.RootIno, "evil", target, c))
		if got, want := e.Stat.Mode&unix.S_IFMT, uint32(unix.S_IFLNK); got != want {
			t.Fatalf("symlink type %o, want %o", got, want)
		}
		ino := e.Ino()
		_, err := l.Mkdir(ino, "x", 0o755, c)
		wantErr(t, "mkdir under symlink "+target, err, syscall.ENOTDIR)
		_, _, err = l.Create(ino, "secret", unix.O_RDWR, 0o644, c, vfs.OpenOptions{})
		wantErr(t, "create under symlink "+target, err, syscall.ENOTDIR)
		_, err = l.Lookup(ino, "secret")
		wantErr(t, "lookup under symlink "+target, err, syscall.ENOTDIR)
		_, err = l.Open(ino, unix.O_RDWR|unix.O_TRUNC, vfs.OpenOptions{})
		wantErr(t, "open of symlink "+target, err, syscall.EINVAL)
		_, err = l.OpenDir(ino)
		wantErr(t, "opendir of symlink "+target, err, syscall.ENOTDIR)
		_, err = l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: 0})
		wantErr(t, "truncate of symlink "+target, err, syscall.EINVAL)
		_, err = l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o777})
		wantErr(t, "chmod of symlink "+target, err, syscall.EOPNOTSUPP)
		// chown and utimes act on the link itself, as lchown does.
		st := must[unix.Stat_t](t)(l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetUid | vfs.SetGid, Uid: 7, Gid: 7}))
		if st.Mode&unix.S_IFMT != unix.S_IFLNK || st.Uid != 7 {
			t.Errorf("lchown: got mode %o uid %d", st.Mode, st.Uid)
		}
		err = l.SetXattr(ino, "trusted.x", []byte("v"), 0)
		_ = err // allowed on the link itself; must not reach the target
		if got := must[string](t)(l.Readlink(ino)); got != target {
			t.Errorf("readlink = %q, want %q", got, target)
		}
		l.Forget(ino, 1)
		must[struct{}](t)(struct{}{}, l.Unlink(vfs.RootIno, "evil"))
	}

	for _, name := range []string{"..", ".", "../x", "a/b", "/etc"} {
		_, err := l.Lookup(vfs.RootIno, name)
		wantErr(t, "lookup "+name, err, syscall.EINVAL)
		_, err = l.Mkdir(vfs.RootIno, name, 0o755, c)
		wantErr(t, "mkdir "+name, err, syscall.EINVAL)
		wantErr(t, "rename to "+name, l.Rename(vfs.RootIno, "nothing", vfs.RootIno, name, 0), syscall.EINVAL)
	}

	// A directory swapped for a symlink while an operation holds it: the
	// operation follows the inode, not the name.
	d := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "d", 0o755, c))
	must[struct{}](t)(struct{}{}, l.Rename(vfs.RootIno, "d", vfs.RootIno, "moved", 0))
	must[vfs.Entry](t)(l.Symlink(vfs.RootIno, "d", outside, c))
	f := must[vfs.Entry](t)(l.Mknod(d.Ino(), "secret", unix.S_IFREG|0o644, 0, c))
	if _, err := os.Lstat(filepath.Join(l.Dir(), "moved", "secret")); err != nil {
		t.Errorf("file made in the swapped directory is not in the moved one: %v", err)
	}

	// Internal names: invisible and unforgeable.
	must[struct{}](t)(struct{}{}, l.AddSeals(f.Ino(), SealGrow))
	for _, name := range []string{"trusted.memfs.seals", "trusted.memfs.whatever"} {
		_, err := l.GetXattr(f.Ino(), name, make([]byte, 64))
		wantErr(t, "getxattr "+name, err, syscall.ENODATA)
		wantErr(t, "setxattr "+name, l.SetXattr(f.Ino(), name, []byte("write"), 0), syscall.EPERM)
		wantErr(t, "removexattr "+name, l.RemoveXattr(f.Ino(), name), syscall.EPERM)
	}
	buf := make([]byte, 256)
	n := must[int](t)(l.ListXattr(f.Ino(), buf))
	if got, want := string(buf[:n]), SealsXattr+"\x00"; got != want {
		t.Errorf("listxattr = %q, want %q", got, want)
	}

	if after := snapshot(t, outside); after != before {
		t.Errorf("outside the volume changed:\nbefore %s\nafter  %s", before, after)
	}
	l.Forget(d.Ino(), 1)
	l.Forget(f.Ino(), 1)
}

// snapshot describes every entry under dir: names, modes, sizes, contents.
func snapshot(t testing.TB, dir string) string {
	t.Helper()
	var b bytes.Buffer
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		b.WriteString(p + " " + fi.Mode().String() + " ")
		if fi.Mode().IsRegular() {
			data, _ := os.ReadFile(p)
			b.Write(data)
		}
		b.WriteString(fi.ModTime().String() + "\n")
		return nil
	})
	return b.String()
}

func TestOwnership(t *testing.T) {
	l := newLayer(t, 16<<20)
	user := vfs.Caller{Uid: 1000, Gid: 2000}
	for _, tc := range []struct {
		name       string
		parentMode uint32
		parentGid  uint32
		mode       uint32
		wantUid    uint32
		wantGid    uint32
		wantMode   uint32
	}{
		{"plain", 0o777, 0, 0o644, 1000, 2000, 0o644},
		{"setgid parent", 0o2777, 3000, 0o644, 1000, 3000, 0o644},
		{"setuid file kept", 0o777, 0, 0o4755, 1000, 2000, 0o4755},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, tc.name, 0o777, vfs.Root))
			defer l.Forget(p.Ino(), 1)
			must[unix.Stat_t](t)(l.SetAttr(p.Ino(), nil, vfs.SetAttr{Valid: vfs.SetGid | vfs.SetMode, Gid: tc.parentGid, Mode: tc.parentMode}))
			e, f, err := l.Create(p.Ino(), "f", unix.O_RDWR|unix.O_EXCL, tc.mode, user, vfs.OpenOptions{})
			if err != nil {
				t.Fatal(err)
			}
			f.Release()
			defer l.Forget(e.Ino(), 1)
			st := e.Stat
			got := [3]uint32{st.Uid, st.Gid, st.Mode & 07777}
			want := [3]uint32{tc.wantUid, tc.wantGid, tc.wantMode}
			if got != want {
				t.Errorf("uid, gid, mode = %v, want %v", got, want)
			}
		})
	}
}

func TestKillSuidGid(t *testing.T) {
	l := newLayer(t, 16<<20)
	e, f, err := l.Create(vfs.RootIno, "f", unix.O_RDWR, 0o6755, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Forget(e.Ino(), 1)
	defer f.Release()
	mode := func() uint32 { return must[unix.Stat_t](t)(l.GetAttr(e.Ino())).Mode & 07777 }

	must[int](t)(f.WriteAt([]byte("x"), 0, false))
	if got, want := mode(), uint32(0o6755); got != want {
		t.Errorf("after a privileged write: mode %o, want %o", got, want)
	}
	must[int](t)(f.WriteAt([]byte("x"), 0, true))
	if got, want := mode(), uint32(0o755); got != want {
		t.Errorf("after an unprivileged write: mode %o, want %o", got, want)
	}
	must[unix.Stat_t](t)(l.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o2750}))
	must[unix.Stat_t](t)(l.SetAttr(e.Ino(), f, vfs.SetAttr{Valid: vfs.SetSize | vfs.KillSuidGid, Size: 0}))
	if got, want := mode(), uint32(0o750); got != want {
		t.Errorf("after an unprivileged truncate: mode %o, want %o", got, want)
	}
	must[unix.Stat_t](t)(l.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o4755}))
	must[unix.Stat_t](t)(l.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetUid, Uid: 5}))
	if got, want := mode(), uint32(0o755); got != want {
		t.Errorf("after chown: mode %o, want %o", got, want)
	}
	// chown(f, -1, -1) reaches memfs as a SetAttr that changes nothing.
	before := must[unix.Stat_t](t)(l.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o6755}))
	time.Sleep(10 * time.Millisecond)
	st := must[unix.Stat_t](t)(l.SetAttr(e.Ino(), nil, vfs.SetAttr{}))
	if got, want := st.Mode&07777, uint32(0o755); got != want || st.Uid != 5 {
		t.Errorf("after chown -1 -1: mode %o uid %d, want %o 5", got, st.Uid, want)
	}
	if st.Ctim == before.Ctim {
		t.Errorf("chown -1 -1 left the change time")
	}
	if f.Direct() {
		t.Error("a writable set-ID file was handed out for passthrough")
	}
}

func TestSeals(t *testing.T) {
	l := newLayer(t, 16<<20)
	data := bytes.Repeat([]byte("s"), 5000) // EOF inside the second page
	newFile := func(t *testing.T, name string) (uint64, vfs.File) {
		e, f, err := l.Create(vfs.RootIno, name, unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{Direct: true})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Forget(e.Ino(), 1) })
		must[int](t)(f.WriteAt(data, 0, false))
		return e.Ino(), f
	}

	t.Run("write", func(t *testing.T) {
		ino, f := newFile(t, "write")
		wantErr(t, "add write seal with a writer open", l.AddSeals(ino, SealWrite|SealGrow), syscall.EBUSY)
		if got := must[Seals](t)(l.Seals(ino)); got != 0 {
			t.Errorf("a failed add left seals %v", got)
		}
		f.Release()
		must[struct{}](t)(struct{}{}, l.AddSeals(ino, SealWrite))
		_, err := l.Open(ino, unix.O_WRONLY, vfs.OpenOptions{})
		wantErr(t, "write open of a write-sealed file", err, syscall.EPERM)
		_, err = l.Open(ino, unix.O_RDONLY|unix.O_TRUNC, vfs.OpenOptions{})
		wantErr(t, "O_TRUNC of a write-sealed file", err, syscall.EPERM)
		r := must[vfs.File](t)(l.Open(ino, unix.O_RDONLY, vfs.OpenOptions{Direct: true}))
		if !r.Direct() {
			t.Error("a read-only open of a sealed file could use passthrough")
		}
		wantErr(t, "punch a hole", r.Allocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, 0, 10), syscall.EPERM)
		r.Release()
	})

	t.Run("grow", func(t *testing.T) {
		ino, f := newFile(t, "grow")
		wantErr(t, "add grow seal with a passthrough writer", l.AddSeals(ino, SealGrow), syscall.EBUSY)
		f.Release()
		must[struct{}](t)(struct{}{}, l.AddSeals(ino, SealGrow))
		w := must[vfs.File](t)(l.Open(ino, unix.O_RDWR, vfs.OpenOptions{Direct: true}))
		defer w.Release()
		if w.Direct() {
			t.Error("a writer of a grow-sealed file could use passthrough")
		}
		for _, tc := range []struct {
			off     int64
			n       int
			wantN   int
			wantErr error
		}{
			{0, 100, 100, nil},             // inside the file
			{4000, 2000, 96, nil},          // cut back to the page holding EOF (4096)
			{4096, 1000, 0, syscall.EPERM}, // grows from inside the EOF page
			{10000, 10, 0, syscall.EPERM},  // past EOF
			{10000, 0, 0, nil},             // empty writes always succeed
		} {
			n, err := w.WriteAt(make([]byte, tc.n), tc.off, false)
			if n != tc.wantN || !errors.Is(err, tc.wantErr) || (err == nil) != (tc.wantErr == nil) {
				t.Errorf("WriteAt(%d bytes at %d) = %d, %v; want %d, %v", tc.n, tc.off, n, err, tc.wantN, tc.wantErr)
			}
		}
		_, err := l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: 6000})
		wantErr(t, "grow by truncate", err, syscall.EPERM)
		wantErr(t, "grow by fallocate", w.Allocate(0, 0, 8192), syscall.EPERM)
		must[struct{}](t)(struct{}{}, w.Allocate(unix.FALLOC_FL_KEEP_SIZE, 0, 8192))
		must[unix.Stat_t](t)(l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: 10}))
	})

	t.Run("shrink and seal", func(t *testing.T) {
		ino, f := newFile(t, "shrink")
		f.Release()
		must[struct{}](t)(struct{}{}, l.SetXattr(ino, SealsXattr, []byte("shrink, seal"), 0))
		buf := make([]byte, 64)
		n := must[int](t)(l.GetXattr(ino, SealsXattr, buf))
		if got, want := string(buf[:n]), "shrink,seal"; got != want {
			t.Errorf("seals xattr = %q, want %q", got, want)
		}
		_, err := l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: 1})
		wantErr(t, "shrink", err, syscall.EPERM)
		_, err = l.Open(ino, unix.O_RDWR|unix.O_TRUNC, vfs.OpenOptions{})
		wantErr(t, "O_TRUNC", err, syscall.EPERM)
		must[unix.Stat_t](t)(l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: 9000}))
		wantErr(t, "add after seal", l.AddSeals(ino, SealWrite), syscall.EPERM)
		wantErr(t, "remove seals", l.RemoveXattr(ino, SealsXattr), syscall.EPERM)
		wantErr(t, "bad seal name", l.SetXattr(ino, SealsXattr, []byte("write,nope"), 0), syscall.EINVAL)
	})

	t.Run("not a regular file", func(t *testing.T) {
		d := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "dir", 0o755, vfs.Root))
		defer l.Forget(d.Ino(), 1)
		wantErr(t, "seal a directory", l.AddSeals(d.Ino(), SealWrite), syscall.EINVAL)
		_, err := l.GetXattr(d.Ino(), SealsXattr, nil)
		wantErr(t, "seals of a directory", err, syscall.ENODATA)
	})

	if got := l.SealViolations(); got == 0 {
		t.Error("no seal violation was counted")
	}
}

func TestParseSeals(t *testing.T) {
	for _, tc := range []struct {
		in      string
		want    Seals
		wantErr bool
		str     string
	}{
		{"", 0, false, ""},
		{"write", SealWrite, false, "write"},
		{"seal,shrink,grow,write", allSeals, false, "write,grow,shrink,seal"},
		{" grow , shrink ", SealGrow | SealShrink, false, "grow,shrink"},
		{"Write", 0, true, ""},
		{"write;grow", 0, true, ""},
	} {
		got, err := ParseSeals(tc.in)
		if (err != nil) != tc.wantErr || got != tc.want || got.String() != tc.str {
			t.Errorf("ParseSeals(%q) = %v (%q), %v; want %v (%q), error %v", tc.in, got, got.String(), err, tc.want, tc.str, tc.wantErr)
		}
	}
}

// TestLimits: writing past the size fails as on tmpfs (short write, then
// ENOSPC) and loses nothing written; Usage and StatFS agree with df.
func TestLimits(t *testing.T) {
	l := newLayer(t, 1<<20)
	e, f, err := l.Create(vfs.RootIno, "big", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Forget(e.Ino(), 1)
	defer f.Release()
	chunk := bytes.Repeat([]byte{0xab}, 256<<10)
	var written int64
	var lastErr error
	for i := 0; i < 8 && lastErr == nil; i++ {
		n, err := f.WriteAt(chunk, written, false)
		written += int64(n)
		lastErr = err
	}
	wantErr(t, "write past the limit", lastErr, syscall.ENOSPC)
	// The limit holds the data and the charge for the two inodes.
	meta := int64(2 * bogoInode * metaCost)
	if written+meta > 1<<20 || written+meta <= 1<<20-metaChunk(1<<20) {
		t.Errorf("wrote %d bytes, want the whole limit %d but the inodes' %d", written, 1<<20, meta)
	}
	got := make([]byte, written)
	n := must[int](t)(f.ReadAt(got, 0))
	if int64(n) != written || !bytes.Equal(got, bytes.Repeat([]byte{0xab}, int(written))) {
		t.Errorf("read back %d bytes that differ from what was written", n)
	}
	u := must[Usage](t)(l.Usage())
	if u.BytesLimit != 1<<20 || u.BytesUsed != 1<<20 || u.MetaBytes != uint64(meta) || u.InodesUsed != 2 || u.InodesLimit != 1024 {
		t.Errorf("usage = %+v", u)
	}
	must[struct{}](t)(struct{}{}, l.Resize(2<<20, 0))
	if u := must[Usage](t)(l.Usage()); u.BytesLimit != 2<<20 {
		t.Errorf("after resize: limit %d", u.BytesLimit)
	}
	wantErr(t, "shrink below use", l.Resize(512<<10, 0), syscall.EINVAL)
}

func TestReferences(t *testing.T) {
	l := newLayer(t, 1<<20)
	e := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "d", 0o755, vfs.Root))
	must[vfs.Entry](t)(l.Lookup(vfs.RootIno, "d"))
	if got, want := l.Refs(e.Ino()), uint64(2); got != want {
		t.Errorf("refs = %d, want %d", got, want)
	}
	d := must[vfs.Dir](t)(l.OpenDir(e.Ino()))
	l.Forget(e.Ino(), 2)
	if got, want := l.Refs(e.Ino()), uint64(1); got != want {
		t.Errorf("refs with the dir open = %d, want %d", got, want)
	}
	d.Close()
	if got := l.Refs(e.Ino()); got != 0 {
		t.Errorf("refs after close = %d, want 0", got)
	}
	_, err := l.GetAttr(e.Ino())
	wantErr(t, "getattr of a forgotten inode", err, syscall.ESTALE)
	l.Forget(vfs.RootIno, 100) // the root is never forgotten
	must[unix.Stat_t](t)(l.GetAttr(vfs.RootIno))
}

func TestReadDirOffsets(t *testing.T) {
	l := newLayer(t, 1<<20)
	names := []string{"a", "b", "c", "d", "e"}
	for _, n := range names {
		e := must[vfs.Entry](t)(l.Mknod(vfs.RootIno, n, unix.S_IFREG|0o644, 0, vfs.Root))
		l.Forget(e.Ino(), 1)
	}
	d := must[vfs.Dir](t)(l.OpenDir(vfs.RootIno))
	defer d.Close()
	var seen []string
	var resume int64
	d.ReadDir(0, func(e *vfs.DirEntry) bool {
		seen = append(seen, e.Name)
		resume = e.Off
		return len(seen) < 4 // ".", "..", and two names
	})
	first := seen[2:]
	// Remove an entry already read and one not yet read: the offset stays
	// valid, nothing is repeated, the remaining names follow.
	must[struct{}](t)(struct{}{}, l.Unlink(vfs.RootIno, first[0]))
	var rest []string
	d.ReadDir(resume, func(e *vfs.DirEntry) bool { rest = append(rest, e.Name); return true })
	all := map[string]int{}
	for _, n := range append(first, rest...) {
		all[n]++
	}
	for _, n := range names {
		if all[n] != 1 {
			t.Errorf("%s seen %d times over a resumed readdir (%v then %v)", n, all[n], first, rest)
		}
	}
}

// TestFdBudget: layers sharing a descriptor budget cache no more than it
// allows, keep working on uncached inodes, and give it all back.
func TestFdBudget(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	budget := NewFdBudget(3)
	var layers [2]*Layer
	for i := range layers {
		l, err := New(filepath.Join(t.TempDir(), "upper"), Options{Size: 1 << 20, Fds: budget})
		if err != nil {
			t.Fatal(err)
		}
		defer l.Close()
		layers[i] = l
	}
	// Each root holds one; two more fit.
	if got, want := budget.InUse(), int64(2); got != want {
		t.Fatalf("in use after two roots: %d, want %d", got, want)
	}
	var held []vfs.Entry
	for _, l := range layers {
		for _, name := range []string{"a", "b", "c"} {
			e := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, name, 0o755, vfs.Root))
			held = append(held, e)
			// Uncached inodes work as well as cached ones.
			f := must[vfs.Entry](t)(l.Mknod(e.Ino(), "f", unix.S_IFREG|0o644, 0, vfs.Root))
			must[unix.Stat_t](t)(l.GetAttr(f.Ino()))
			must[struct{}](t)(struct{}{}, l.SetXattr(f.Ino(), "user.k", []byte("v"), 0))
			l.Forget(f.Ino(), 1)
		}
		if err := l.CheckInvariants(); err != nil {
			t.Error(err)
		}
	}
	if got, want := budget.InUse(), int64(3); got != want {
		t.Errorf("in use with 6 directories held: %d, want the budget %d", got, want)
	}
	for i, e := range held {
		layers[i/3].Forget(e.Ino(), 1)
	}
	if got, want := budget.InUse(), int64(2); got != want {
		t.Errorf("in use after forgetting: %d, want %d (the roots)", got, want)
	}
}

// TestMknod checks the types Mknod makes and refuses, as mknodat(2) on
// tmpfs does, and that a device's number is kept only for devices.
func TestMknod(t *testing.T) {
	l := newLayer(t, 1<<20)
	for _, tc := range []struct {
		name     string
		mode     uint32
		rdev     uint64
		want     error
		wantType uint32
		wantRdev uint64
	}{
		{"chr", unix.S_IFCHR | 0o640, unix.Mkdev(1, 3), nil, unix.S_IFCHR, unix.Mkdev(1, 3)},
		{"blk", unix.S_IFBLK | 0o600, unix.Mkdev(7, 0), nil, unix.S_IFBLK, unix.Mkdev(7, 0)},
		{"bigdev", unix.S_IFCHR | 0o600, unix.Mkdev(4095, 1<<20-1), nil, unix.S_IFCHR, unix.Mkdev(4095, 1<<20-1)},
		{"zero", unix.S_IFCHR | 0o600, 0, nil, unix.S_IFCHR, 0},
		{"fifo", unix.S_IFIFO | 0o644, unix.Mkdev(1, 3), nil, unix.S_IFIFO, 0},
		{"sock", unix.S_IFSOCK | 0o644, unix.Mkdev(1, 3), nil, unix.S_IFSOCK, 0},
		{"reg", unix.S_IFREG | 0o644, unix.Mkdev(1, 3), nil, unix.S_IFREG, 0},
		{"notype", 0o644, 0, nil, unix.S_IFREG, 0},
		{"toobig", unix.S_IFCHR | 0o600, unix.Mkdev(4096, 0), syscall.EINVAL, 0, 0},
		{"dir", unix.S_IFDIR | 0o755, 0, syscall.EPERM, 0, 0},
		{"lnk", unix.S_IFLNK | 0o777, 0, syscall.EINVAL, 0, 0},
	} {
		e, err := l.Mknod(vfs.RootIno, tc.name, tc.mode, tc.rdev, vfs.Root)
		wantErr(t, "mknod "+tc.name, err, tc.want)
		if err != nil {
			continue
		}
		st := must[unix.Stat_t](t)(l.GetAttr(e.Ino()))
		if got, want := st.Mode, tc.wantType|tc.mode&07777; got != want || e.Stat.Mode != want {
			t.Errorf("%s: mode %o (entry %o), want %o", tc.name, got, e.Stat.Mode, want)
		}
		if got, want := st.Rdev, tc.wantRdev; got != want || e.Stat.Rdev != want {
			t.Errorf("%s: rdev %#x (entry %#x), want %#x", tc.name, got, e.Stat.Rdev, want)
		}
		l.Forget(e.Ino(), 1)
	}
}

// TestDevices checks that a device node is a file like the others for
// every operation but opening, which fails here and through the instance
// (nodev).
func TestDevices(t *testing.T) {
	l := newLayer(t, 1<<20)
	c := vfs.Caller{Uid: 1000, Gid: 1001}
	dev := unix.Mkdev(1, 3) // /dev/null
	e := must[vfs.Entry](t)(l.Mknod(vfs.RootIno, "null", unix.S_IFCHR|0o666, dev, c))
	defer l.Forget(e.Ino(), 1)
	if e.Stat.Uid != c.Uid || e.Stat.Gid != c.Gid {
		t.Errorf("owner %d:%d, want %d:%d", e.Stat.Uid, e.Stat.Gid, c.Uid, c.Gid)
	}

	_, err := l.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{})
	wantErr(t, "open", err, syscall.EINVAL)
	_, err = unix.Open(filepath.Join(l.dir, "null"), unix.O_RDONLY|unix.O_CLOEXEC, 0)
	wantErr(t, "open through the instance", err, syscall.EACCES)
	_, err = l.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetSize})
	wantErr(t, "truncate", err, syscall.EINVAL)

	st := must[unix.Stat_t](t)(l.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode | vfs.SetUid | vfs.SetGid, Mode: 0o600, Uid: 7, Gid: 8}))
	if st.Mode != unix.S_IFCHR|0o600 || st.Uid != 7 || st.Gid != 8 || st.Rdev != dev {
		t.Errorf("after chmod and chown: mode %o owner %d:%d rdev %#x", st.Mode, st.Uid, st.Gid, st.Rdev)
	}

	ln := must[vfs.Entry](t)(l.Link(e.Ino(), vfs.RootIno, "null2"))
	l.Forget(ln.Ino(), 1)
	if ln.Ino() != e.Ino() || ln.Stat.Nlink != 2 || ln.Stat.Rdev != dev {
		t.Errorf("link: ino %d nlink %d rdev %#x", ln.Ino(), ln.Stat.Nlink, ln.Stat.Rdev)
	}
	d := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "d", 0o755, vfs.Root))
	defer l.Forget(d.Ino(), 1)
	wantErr(t, "rename", l.Rename(vfs.RootIno, "null", d.Ino(), "moved", 0), nil)
	moved := must[vfs.Entry](t)(l.Lookup(d.Ino(), "moved"))
	l.Forget(moved.Ino(), 1)
	if moved.Ino() != e.Ino() || moved.Stat.Rdev != dev {
		t.Errorf("renamed: ino %d rdev %#x", moved.Ino(), moved.Stat.Rdev)
	}
	dir := must[vfs.Dir](t)(l.OpenDir(d.Ino()))
	var types []uint8
	dir.ReadDir(0, func(de *vfs.DirEntry) bool {
		if de.Name == "moved" {
			types = append(types, de.Type)
		}
		return true
	})
	dir.Close()
	if len(types) != 1 || types[0] != unix.DT_CHR {
		t.Errorf("readdir types of the device: %v, want [%d]", types, unix.DT_CHR)
	}

	wantErr(t, "unlink", l.Unlink(d.Ino(), "moved"), nil)
	wantErr(t, "unlink", l.Unlink(vfs.RootIno, "null2"), nil)
	_, err = l.Lookup(vfs.RootIno, "null2")
	wantErr(t, "lookup after unlink", err, syscall.ENOENT)
	st = must[unix.Stat_t](t)(l.GetAttr(e.Ino()))
	if st.Nlink != 0 || st.Rdev != dev {
		t.Errorf("unlinked device still held: nlink %d rdev %#x", st.Nlink, st.Rdev)
	}
}

// TestMetadataCountsAgainstSize fills a small volume whose inode limit is
// far away with xattrs, then with empty files: tmpfs keeps both outside
// its size, memfs charges them to it. Each fill ends in ENOSPC once the
// charge reaches the size, Usage and StatFS show the volume full, data
// has no room left, and removing what was stored gives the room back.
func TestMetadataCountsAgainstSize(t *testing.T) {
	const size = 1 << 20
	for _, fill := range []string{"xattrs", "inodes"} {
		t.Run(fill, func(t *testing.T) {
			if os.Geteuid() != 0 {
				t.Skip("needs root to mount tmpfs")
			}
			dir := filepath.Join(t.TempDir(), "upper")
			l, err := New(dir, Options{Size: size, Inodes: 1500000})
			if err != nil {
				t.Fatal(err)
			}
			closeAtCleanup(t, l)
			e := must[vfs.Entry](t)(l.Mknod(vfs.RootIno, "f", unix.S_IFREG|0o644, 0, vfs.Root))
			defer l.Forget(e.Ino(), 1)
			value := bytes.Repeat([]byte("v"), 1000)
			var stored, n int64 // inode space taken, items
			var err2 error
			for stored*metaCost < 4*size {
				name := fmt.Sprintf("x%06d", n)
				if fill == "xattrs" {
					name = "user." + name
					err2 = l.SetXattr(e.Ino(), name, value, 0)
					stored += int64(xattrSpace + len(name) + len(value))
				} else {
					var ne vfs.Entry
					if ne, err2 = l.Mknod(vfs.RootIno, name, unix.S_IFREG|0o644, 0, vfs.Root); err2 == nil {
						l.Forget(ne.Ino(), 1)
					}
					stored += bogoInode
				}
				if err2 != nil {
					break
				}
				n++
			}
			wantErr(t, "filling "+fill, err2, syscall.ENOSPC)
			u := must[Usage](t)(l.Usage())
			t.Logf("%d %s stored; usage %+v", n, fill, u)
			if u.BytesLimit != size || u.BytesUsed < size-uint64(metaChunk(size)) || u.BytesUsed > size || u.MetaBytes+uint64(metaChunk(size)) < u.BytesUsed {
				t.Errorf("usage = %+v, want the %d bytes nearly all used, by metadata", u, size)
			}
			if st := must[unix.Statfs_t](t)(l.StatFS()); (st.Blocks-st.Bfree)*uint64(st.Bsize) != u.BytesUsed {
				t.Errorf("statfs used %d, usage %d", (st.Blocks-st.Bfree)*uint64(st.Bsize), u.BytesUsed)
			}
			// Measured from outside, as the driver measures a lost
			// volume's layer: the charge is counted, the room kept
			// beyond it is not (at most a step).
			mu := must[Usage](t)(MountedUsage(dir))
			if mu.MetaBytes != u.MetaBytes || mu.BytesUsed > u.BytesUsed || mu.BytesUsed+uint64(metaChunk(size)) < u.BytesUsed ||
				mu.BytesLimit > size || mu.BytesLimit+uint64(metaChunk(size)) < size {
				t.Errorf("MountedUsage = %+v, want the Layer's %+v less at most a step of %d", mu, u, metaChunk(size))
			}
			_, df, err := l.Create(vfs.RootIno, "data", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
			if err == nil {
				var w int
				w, err = df.WriteAt(make([]byte, 64<<10), 0, false)
				df.Release()
				if err == nil && w < 64<<10 {
					err = syscall.ENOSPC // a short write
				}
			}
			wantErr(t, "a 64 KiB write into the full volume", err, syscall.ENOSPC)

			// Removing what was stored gives the room back.
			for i := range n {
				name := fmt.Sprintf("x%06d", i)
				if fill == "xattrs" {
					err = l.RemoveXattr(e.Ino(), "user."+name)
				} else {
					err = l.Unlink(vfs.RootIno, name)
				}
				if err != nil {
					t.Fatal(err)
				}
			}
			if u := must[Usage](t)(l.Usage()); u.BytesUsed > size/8 {
				t.Errorf("after removing the %s: usage %+v", fill, u)
			}
			if l.Unlink(vfs.RootIno, "data") == nil {
				_, df, err = l.Create(vfs.RootIno, "data", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
				if err == nil {
					_, err = df.WriteAt(make([]byte, size/2), 0, false)
					df.Release()
				}
			}
			if err != nil {
				t.Errorf("writing half the size after removing the %s: %v", fill, err)
			}
		})
	}
}

// TestReservedCoversMetadata: after every operation that reserves inode
// space, reserved covers all the inode space in use, though reserveMeta
// asks statfs only when what it counted runs out, and markers take space
// without reserving it.
func TestReservedCoversMetadata(t *testing.T) {
	l := newLayer(t, 4<<20)
	value := bytes.Repeat([]byte("m"), 4000)
	for n := range 200 {
		e, err := l.Mknod(vfs.RootIno, fmt.Sprintf("f%d", n), unix.S_IFREG|0o644, 0, vfs.Root)
		if err != nil {
			t.Fatalf("mknod %d: %v", n, err)
		}
		var st unix.Statfs_t
		if err := unix.Fstatfs(l.rootFd, &st); err != nil {
			t.Fatal(err)
		}
		if used, r := metaUsed(&st), l.reserved.Load(); used > r {
			t.Fatalf("after %d files: metadata charge %d, reserved %d", n+1, used, r)
		}
		if n%3 == 0 {
			if err := l.SetMarker(e.Ino(), "test", value, 0); err != nil {
				t.Fatal(err)
			}
		}
		l.Forget(e.Ino(), 1)
	}
}
