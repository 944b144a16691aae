package fusefs

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"sync"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// The tests of this file serve a tree that a previous file system built and
// then dropped without closing it, as a process that dies would: the
// instance stays mounted and its inode numbers are all the new file system
// gets. They need root (tmpfs) but no FUSE mount.

func rdNeedRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root to mount tmpfs")
	}
}

// rederiveOpts are the limits of the test instances.
var rederiveOpts = memfs.Options{Size: 64 << 20}

// reopenLayer serves the instance on dir again; cleanup checks the layer
// and closes it, which unmounts the instance.
func reopenLayer(t testing.TB, dir string) *memfs.Layer {
	t.Helper()
	l, err := memfs.Open(dir, rederiveOpts)
	if err != nil {
		t.Fatal(err)
	}
	closeAtCleanup(t, l, "")
	return l
}

// rdOK returns a function that fails the test if err is not nil, and
// returns v.
func rdOK[T any](t testing.TB) func(v T, err error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}

// rdIno is rdOK for an Entry, returning its inode number.
func rdIno(t testing.TB) func(e vfs.Entry, err error) uint64 {
	return func(e vfs.Entry, err error) uint64 {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return e.Ino()
	}
}

// rdNoErr fails the test if err is not nil.
func rdNoErr(t testing.TB, err error) {
	t.Helper()
	if err != nil {
		t.Fatal(err)
	}
}

func rdErrno(t testing.TB, what string, got, want error) {
	t.Helper()
	if got != want {
		t.Errorf("%s: got %v, want %v", what, got, want)
	}
}

// rdRead reads the file ino through fs.
func rdRead(t testing.TB, fs vfs.FS, ino uint64) string {
	t.Helper()
	f := rdOK[vfs.File](t)(fs.Open(ino, unix.O_RDONLY, vfs.OpenOptions{}))
	defer f.Release()
	buf := make([]byte, 1<<16)
	n, err := f.ReadAt(buf, 0)
	if err != nil {
		t.Fatal(err)
	}
	return string(buf[:n])
}

// rdNames lists the directory ino through fs, "." and ".." left out.
func rdNames(t testing.TB, fs vfs.FS, ino uint64) []string {
	t.Helper()
	d := rdOK[vfs.Dir](t)(fs.OpenDir(ino))
	defer d.Close()
	var out []string
	if err := d.ReadDir(0, func(e *vfs.DirEntry) bool {
		if e.Name != "." && e.Name != ".." {
			out = append(out, e.Name)
		}
		return true
	}); err != nil {
		t.Fatal(err)
	}
	sort.Strings(out)
	return out
}

// rdForgetAll drops every reference to inos, as the kernel's FORGETs of
// nodes it had looked up an unknown number of times would.
func rdForgetAll(fs vfs.FS, inos ...uint64) {
	for _, ino := range inos {
		fs.Forget(ino, 1<<30)
	}
}

// walksDone returns how many walks r has made.
func (r *rederiver) walksDone() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.walks
}

func TestRederiveMemfs(t *testing.T) {
	rdNeedRoot(t)
	dir := filepath.Join(t.TempDir(), "vol")
	old, err := memfs.New(dir, rederiveOpts)
	if err != nil {
		t.Fatal(err)
	}
	mkdir := func(parent uint64, name string) uint64 {
		return rdIno(t)(old.Mkdir(parent, name, 0o755, vfs.Root))
	}
	create := func(parent uint64, name, data string) uint64 {
		e, f, err := old.Create(parent, name, unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
		if err != nil {
			t.Fatal(err)
		}
		rdOK[int](t)(f.WriteAt([]byte(data), 0, false))
		f.Release()
		return e.Ino()
	}
	a := mkdir(vfs.RootIno, "a")
	b := mkdir(a, "b")
	c := mkdir(b, "c")
	f := create(c, "f", "hello")
	k := create(c, "k", "kay") // one name, below a, b and c
	sym := rdIno(t)(old.Symlink(b, "sym", "c/f", vfs.Root))
	rdOK[vfs.Entry](t)(old.Link(f, a, "hl"))
	x := mkdir(vfs.RootIno, "x")
	y := create(x, "y", "why")
	// g is removed while a descriptor of it stays open: it is alive but in
	// no directory.
	ge, gf, err := old.Create(vfs.RootIno, "g", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	defer gf.Release()
	g := ge.Ino()
	rdNoErr(t, old.Unlink(vfs.RootIno, "g"))
	// old is dropped without Close: the instance stays mounted.

	l := reopenLayer(t, dir)
	raw := l
	r := rederiving(raw).(*rederiver)
	all := []uint64{a, b, c, f, k, sym, x, y}

	_, err = raw.GetAttr(f)
	rdErrno(t, "raw getattr of a node never looked up", err, syscall.ESTALE)
	// a is known already, with two references: derivation adds none, the
	// walk keeps the one it took to descend into it (see Limits).
	rdOK[vfs.Entry](t)(raw.Lookup(vfs.RootIno, "a"))
	rdOK[vfs.Entry](t)(raw.Lookup(vfs.RootIno, "a"))

	t.Run("getattr", func(t *testing.T) {
		st := rdOK[unix.Stat_t](t)(r.GetAttr(f))
		if st.Ino != f || st.Size != 5 || st.Nlink != 2 {
			t.Errorf("getattr f: ino %d size %d nlink %d", st.Ino, st.Size, st.Nlink)
		}
		rdOK[unix.Stat_t](t)(r.GetAttr(k))
		for _, tc := range []struct {
			name string
			ino  uint64
			want uint64
		}{{"a (known before)", a, 3}, {"b", b, 1}, {"c", c, 1}, {"k", k, 1}, {"f", f, 1}} {
			if got := l.Refs(tc.ino); got != tc.want {
				t.Errorf("refs of %s = %d, want %d", tc.name, got, tc.want)
			}
		}
		for _, ino := range []uint64{f, k} {
			r.Forget(ino, 1)
			_, err := raw.GetAttr(ino)
			rdErrno(t, "raw getattr after forgetting the one reference", err, syscall.ESTALE)
			rdOK[unix.Stat_t](t)(r.GetAttr(ino))
		}
		if got := r.walksDone(); got != 1 {
			t.Errorf("%d walks, want 1: the index is reused", got)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("open", func(t *testing.T) {
		if got := rdRead(t, r, f); got != "hello" {
			t.Errorf("read %q", got)
		}
		if got := l.Refs(f); got != 1 {
			t.Errorf("refs after release = %d, want 1", got)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("readlink", func(t *testing.T) {
		if got := rdOK[string](t)(r.Readlink(sym)); got != "c/f" {
			t.Errorf("readlink = %q", got)
		}
	})
	t.Run("opendir", func(t *testing.T) {
		if got := fmt.Sprint(rdNames(t, r, x)); got != "[y]" {
			t.Errorf("entries of x = %s", got)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("lookup", func(t *testing.T) {
		if e := rdOK[vfs.Entry](t)(r.Lookup(c, "f")); e.Ino() != f {
			t.Errorf("lookup c/f = %d, want %d", e.Ino(), f)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("setattr and xattrs", func(t *testing.T) {
		st := rdOK[unix.Stat_t](t)(r.SetAttr(y, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o600}))
		if st.Mode != unix.S_IFREG|0o600 {
			t.Errorf("mode after setattr = %o", st.Mode)
		}
		rdForgetAll(raw, all...)
		rdNoErr(t, r.SetXattr(y, "user.k", []byte("v"), 0))
		rdForgetAll(raw, all...)
		buf := make([]byte, 8)
		if n := rdOK[int](t)(r.GetXattr(y, "user.k", buf)); string(buf[:n]) != "v" {
			t.Errorf("xattr = %q", buf[:n])
		}
	})
	rdForgetAll(raw, all...)

	t.Run("rename between unknown directories", func(t *testing.T) {
		rdNoErr(t, r.Rename(b, "c", x, "c2", 0))
		rdForgetAll(raw, all...)
		// f's indexed path a/hl still holds; c's a/b/c is stale.
		if st := rdOK[unix.Stat_t](t)(r.GetAttr(c)); st.Ino != c {
			t.Errorf("getattr c = %d", st.Ino)
		}
		if e := rdOK[vfs.Entry](t)(raw.Lookup(x, "c2")); e.Ino() != c {
			t.Errorf("x/c2 is %d, want c %d", e.Ino(), c)
		}
		if got := r.walksDone(); got != 2 {
			t.Errorf("%d walks, want 2: one after the rename", got)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("unlink and link", func(t *testing.T) {
		rdNoErr(t, r.Unlink(c, "f"))
		rdForgetAll(raw, all...)
		if st := rdOK[unix.Stat_t](t)(r.GetAttr(f)); st.Nlink != 1 {
			t.Errorf("nlink after unlink = %d, want 1", st.Nlink)
		}
		rdForgetAll(raw, all...)
		if e := rdOK[vfs.Entry](t)(r.Link(f, x, "f3")); e.Ino() != f {
			t.Errorf("link = %d", e.Ino())
		}
		if got := fmt.Sprint(rdNames(t, r, x)); got != "[c2 f3 y]" {
			t.Errorf("entries of x = %s", got)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("moved outside the decorator", func(t *testing.T) {
		rdNoErr(t, raw.Rename(vfs.RootIno, "x", vfs.RootIno, "x2", 0))
		before := r.walksDone()
		if got := rdRead(t, r, y); got != "why" {
			t.Errorf("read %q", got)
		}
		if got := r.walksDone(); got != before+1 {
			t.Errorf("%d walks, want %d: the stale path makes one", got, before+1)
		}
	})
	rdForgetAll(raw, all...)

	t.Run("unknown", func(t *testing.T) {
		for _, ino := range []uint64{g, 1 << 40} {
			_, err := r.GetAttr(ino)
			rdErrno(t, fmt.Sprintf("getattr %d", ino), err, syscall.ESTALE)
			_, err = r.Open(ino, unix.O_RDONLY, vfs.OpenOptions{})
			rdErrno(t, fmt.Sprintf("open %d", ino), err, syscall.ESTALE)
		}
		before := r.walksDone()
		r.GetAttr(g)
		if got := r.walksDone(); got != before {
			t.Errorf("a repeated miss walked again (%d walks, want %d)", got, before)
		}
		rdOK[vfs.Entry](t)(r.Mkdir(vfs.RootIno, "new", 0o755, vfs.Root))
		r.GetAttr(g)
		if got := r.walksDone(); got != before+1 {
			t.Errorf("a miss after a mkdir: %d walks, want %d", got, before+1)
		}
		rdOK[unix.Stat_t](t)(r.GetAttr(vfs.RootIno))
	})

	t.Run("concurrent", func(t *testing.T) {
		rdForgetAll(raw, all...)
		var wg sync.WaitGroup
		for i := range 8 {
			ino := []uint64{f, y, c, sym}[i%4]
			wg.Go(func() {
				if _, err := r.GetAttr(ino); err != nil {
					t.Errorf("getattr %d: %v", ino, err)
				}
			})
		}
		wg.Wait()
		for _, ino := range []uint64{f, y, c, sym} {
			if got := l.Refs(ino); got != 1 {
				t.Errorf("refs of %d = %d, want 1", ino, got)
			}
		}
	})
	rdForgetAll(raw, all...)
}

// makeRederiveLower builds the lower tree of TestRederiveOverlay.
func makeRederiveLower(t testing.TB) string {
	t.Helper()
	root := t.TempDir()
	for _, d := range []string{"l1", "l1/l2", "rd", "lo"} {
		if err := os.Mkdir(filepath.Join(root, d), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	for name, data := range map[string]string{
		"l1/l2/deep": "deep lower",
		"cu":         "copy me",
		"rd/inner":   "inner",
		"lo/f":       "lower only",
		"h1":         "linked",
	} {
		if err := os.WriteFile(filepath.Join(root, name), []byte(data), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.Link(filepath.Join(root, "h1"), filepath.Join(root, "l1/h2")); err != nil {
		t.Fatal(err)
	}
	return root
}

func TestRederiveOverlay(t *testing.T) {
	rdNeedRoot(t)
	lowerDir := makeRederiveLower(t)
	dir := filepath.Join(t.TempDir(), "upper")
	upper, err := memfs.New(dir, rederiveOpts)
	if err != nil {
		t.Fatal(err)
	}
	dl := rdOK[*overlay.DirLower](t)(overlay.NewDirLower(lowerDir))
	old := rdOK[*overlay.FS](t)(overlay.New(upper, dl))
	path := func(names ...string) uint64 {
		ino := vfs.RootIno
		for _, n := range names {
			ino = rdIno(t)(old.Lookup(ino, n))
		}
		return ino
	}
	// Copy cu up, rename the lower directory rd, make an upper directory
	// and file inside a lower one.
	cu := path("cu")
	w := rdOK[vfs.File](t)(old.Open(cu, unix.O_RDWR, vfs.OpenOptions{}))
	rdOK[int](t)(w.WriteAt([]byte("COPIED"), 0, false))
	w.Release()
	rdNoErr(t, old.Rename(vfs.RootIno, "rd", vfs.RootIno, "rd2", 0))
	up := rdIno(t)(old.Mkdir(path("l1"), "up", 0o755, vfs.Root))
	e, uf, err := old.Create(up, "u", unix.O_RDWR, 0o644, vfs.Root, vfs.OpenOptions{})
	if err != nil {
		t.Fatal(err)
	}
	rdOK[int](t)(uf.WriteAt([]byte("upper"), 0, false))
	uf.Release()
	inos := map[string]uint64{
		"l1": path("l1"), "l2": path("l1", "l2"), "deep": path("l1", "l2", "deep"),
		"cu": cu, "rd2": path("rd2"), "inner": path("rd2", "inner"),
		"lo": path("lo"), "lo/f": path("lo", "f"), "up": up, "u": e.Ino(),
		"h1": path("h1"), "h2": path("l1", "h2"),
	}
	want := map[string]unix.Stat_t{}
	for name, ino := range inos {
		want[name] = rdOK[unix.Stat_t](t)(old.GetAttr(ino))
	}
	if inos["h1"] != inos["h2"] {
		t.Errorf("lower hard links have inode numbers %d and %d", inos["h1"], inos["h2"])
	}
	// old and upper are dropped without Close; a dead process closes its
	// descriptors, the lower's among them.
	dl.Close()

	l := reopenLayer(t, dir)
	dl2 := rdOK[*overlay.DirLower](t)(overlay.NewDirLower(lowerDir))
	ofs := rdOK[*overlay.FS](t)(overlay.New(l, dl2))
	t.Cleanup(func() {
		if err := ofs.CheckInvariants(); err != nil {
			t.Errorf("invariants: %v", err)
		}
		ofs.Close()
		dl2.Close()
	})
	raw := ofs
	r := rederiving(raw).(*rederiver)
	all := func() []uint64 {
		var out []uint64
		for _, ino := range inos {
			out = append(out, ino)
		}
		return out
	}

	_, err = raw.GetAttr(inos["deep"])
	rdErrno(t, "raw getattr of a node never looked up", err, syscall.ESTALE)

	t.Run("getattr", func(t *testing.T) {
		for name, ino := range inos {
			rdForgetAll(raw, all()...)
			st := rdOK[unix.Stat_t](t)(r.GetAttr(ino))
			w := want[name]
			if st.Ino != w.Ino || st.Mode != w.Mode || st.Size != w.Size || st.Nlink != w.Nlink {
				t.Errorf("%s: ino %d mode %o size %d nlink %d, want %d %o %d %d",
					name, st.Ino, st.Mode, st.Size, st.Nlink, w.Ino, w.Mode, w.Size, w.Nlink)
			}
			r.Forget(ino, 1)
			if w.Mode&unix.S_IFMT == unix.S_IFDIR {
				continue // the walk keeps a reference on directories
			}
			if _, err := raw.GetAttr(ino); err != syscall.ESTALE {
				t.Errorf("%s: raw getattr after one forget = %v, want ESTALE", name, err)
			}
		}
		if got := r.walksDone(); got != 1 {
			t.Errorf("%d walks, want 1", got)
		}
	})
	rdForgetAll(raw, all()...)

	t.Run("read", func(t *testing.T) {
		for name, data := range map[string]string{
			"deep": "deep lower", "cu": "COPIEDe", "inner": "inner", "lo/f": "lower only", "u": "upper", "h2": "linked",
		} {
			rdForgetAll(raw, all()...)
			if got := rdRead(t, r, inos[name]); got != data {
				t.Errorf("%s: read %q, want %q", name, got, data)
			}
		}
	})
	rdForgetAll(raw, all()...)

	t.Run("readdir and lookup", func(t *testing.T) {
		if got := fmt.Sprint(rdNames(t, r, inos["rd2"])); got != "[inner]" {
			t.Errorf("entries of rd2 = %s", got)
		}
		rdForgetAll(raw, all()...)
		if got := fmt.Sprint(rdNames(t, r, inos["l1"])); got != "[h2 l2 up]" {
			t.Errorf("entries of l1 = %s", got)
		}
		rdForgetAll(raw, all()...)
		if e := rdOK[vfs.Entry](t)(r.Lookup(inos["l2"], "deep")); e.Ino() != inos["deep"] {
			t.Errorf("lookup l2/deep = %d, want %d", e.Ino(), inos["deep"])
		}
	})
	rdForgetAll(raw, all()...)

	t.Run("change", func(t *testing.T) {
		st := rdOK[unix.Stat_t](t)(r.SetAttr(inos["lo/f"], nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o600}))
		if st.Mode != unix.S_IFREG|0o600 || st.Ino != inos["lo/f"] {
			t.Errorf("setattr of a lower file: ino %d mode %o", st.Ino, st.Mode)
		}
		rdForgetAll(raw, all()...)
		rdNoErr(t, r.Rename(inos["l2"], "deep", inos["rd2"], "moved", 0))
		rdForgetAll(raw, all()...)
		if st := rdOK[unix.Stat_t](t)(r.GetAttr(inos["deep"])); st.Ino != inos["deep"] {
			t.Errorf("getattr of the moved file: ino %d", st.Ino)
		}
		if e := rdOK[vfs.Entry](t)(raw.Lookup(inos["rd2"], "moved")); e.Ino() != inos["deep"] {
			t.Errorf("rd2/moved = %d, want %d", e.Ino(), inos["deep"])
		}
		rdForgetAll(raw, all()...)
		rdNoErr(t, r.Unlink(inos["lo"], "f"))
		rdForgetAll(raw, all()...)
		_, err := r.GetAttr(inos["lo/f"])
		rdErrno(t, "getattr of a removed lower file", err, syscall.ESTALE)
		_, err = r.GetAttr(1<<63 | 12345)
		rdErrno(t, "getattr of an unknown inode", err, syscall.ESTALE)
	})
	rdForgetAll(raw, all()...)
}

// rederiveTree fills the directory root of fs with dirs directories of
// files files each, and returns the last file's and its directory's inode
// numbers.
func rederiveTree(b *testing.B, l *memfs.Layer, dirs, files int) (dir, file uint64) {
	for i := range dirs {
		dir = rdIno(b)(l.Mkdir(vfs.RootIno, fmt.Sprintf("d%03d", i), 0o755, vfs.Root))
		for j := range files {
			file = rdIno(b)(l.Mknod(dir, fmt.Sprintf("file%03d", j), unix.S_IFREG|0o644, 0, vfs.Root))
			l.Forget(file, 1)
		}
		l.Forget(dir, 1)
	}
	return dir, file
}

// BenchmarkRederive measures a re-derivation on a tree of 100 directories
// of 100 files: "first" builds the index (a new rederiver each time),
// "later" uses it; "known" is the success path of a wrapped GetAttr and
// "raw" the same call unwrapped.
func BenchmarkRederive(b *testing.B) {
	rdNeedRoot(b)
	const dirs, files = 100, 100
	l, err := memfs.New(filepath.Join(b.TempDir(), "vol"), rederiveOpts)
	if err != nil {
		b.Fatal(err)
	}
	defer l.Close()
	dir, file := rederiveTree(b, l, dirs, files)
	raw := l

	lowerDir := b.TempDir()
	for i := range dirs {
		d := filepath.Join(lowerDir, fmt.Sprintf("d%03d", i))
		os.Mkdir(d, 0o755)
		for j := range files {
			os.WriteFile(filepath.Join(d, fmt.Sprintf("file%03d", j)), nil, 0o644)
		}
	}
	ul, err := memfs.New(filepath.Join(b.TempDir(), "upper"), rederiveOpts)
	if err != nil {
		b.Fatal(err)
	}
	defer ul.Close()
	dl := rdOK[*overlay.DirLower](b)(overlay.NewDirLower(lowerDir))
	defer dl.Close()
	ofs := rdOK[*overlay.FS](b)(overlay.New(ul, dl))
	defer ofs.Close()
	oraw := ofs
	odir := rdIno(b)(oraw.Lookup(vfs.RootIno, fmt.Sprintf("d%03d", dirs-1)))
	ofile := rdIno(b)(oraw.Lookup(odir, fmt.Sprintf("file%03d", files-1)))
	rdForgetAll(oraw, ofile, odir)

	derive := func(b *testing.B, r vfs.FS, fs vfs.FS, dir, file uint64) {
		if _, err := r.GetAttr(file); err != nil {
			b.Fatal(err)
		}
		rdForgetAll(fs, file, dir)
	}
	b.Run("first/memfs", func(b *testing.B) {
		for b.Loop() {
			derive(b, rederiving(raw), raw, dir, file)
		}
	})
	b.Run("first/overlay", func(b *testing.B) {
		for b.Loop() {
			derive(b, rederiving(oraw), oraw, odir, ofile)
		}
	})
	b.Run("later/memfs", func(b *testing.B) {
		r := rederiving(raw)
		derive(b, r, raw, dir, file)
		for b.Loop() {
			derive(b, r, raw, dir, file)
		}
	})
	b.Run("index", func(b *testing.B) {
		var before, after runtime.MemStats
		var r *rederiver
		for b.Loop() {
			r = nil
			runtime.GC()
			runtime.ReadMemStats(&before)
			r = rederiving(raw).(*rederiver)
			derive(b, r, raw, dir, file)
			runtime.GC()
			runtime.ReadMemStats(&after)
		}
		b.ReportMetric(float64(after.HeapAlloc-before.HeapAlloc)/float64(len(r.index)), "B/entry")
		runtime.KeepAlive(r)
	})
	b.Run("known/raw", func(b *testing.B) {
		for b.Loop() {
			raw.GetAttr(vfs.RootIno)
		}
	})
	b.Run("known/wrapped", func(b *testing.B) {
		r := rederiving(raw)
		for b.Loop() {
			r.GetAttr(vfs.RootIno)
		}
	})
}
