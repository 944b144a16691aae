package memfs

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// FuzzOps decodes bytes into a sequence of file system operations, runs each
// on memfs and on a plain host directory, and compares every result. Paths
// may cross pod-planted symlinks (to "/", "..", a directory outside the
// volume) and use names like ".." or "a/b". After the sequence both trees
// must be equal, no reference may be left, the layer's invariants must hold,
// and a sentinel directory outside the volume must be untouched.
func FuzzOps(f *testing.F) {
	for _, seed := range [][]byte{
		{0, 0, 0, 1, 1, 5, 9, 1, 10, 1},                     // mkdir a, create a/b, read, stat
		{7, 0, 2, 1, 0, 0, 0, 1, 0, 3},                      // symlink a -> outside, create under it
		{7, 0, 0, 0, 0, 0, 1, 0, 1, 2, 11, 0},               // symlink to "/", mkdir beneath, readdir
		{0, 0, 0, 0, 1, 0, 6, 0, 1, 0, 0, 11, 1},            // mkdir a, mkdir b, rename a -> b
		{1, 0, 1, 3, 8, 0, 1, 2, 4, 0, 10, 2},               // create, link, unlink, stat
		{0, 0, 0, 6, 0, 0, 6, 3, 0, 2, 5, 4},                // rename with bad names
		{1, 0, 0, 9, 2, 0, 0, 40, 3, 3, 0, 7, 9, 0},         // write at offsets, truncate, read
		{1, 0, 2, 1, 13, 0, 2, 1, 12, 0, 2, 0o15, 10, 0, 2}, // xattrs, chmod, stat
		{0, 0, 0, 1, 0, 1, 4, 1, 6, 0, 1, 0, 2, 2},          // exchange a dir and a file
	} {
		f.Add(seed)
	}
	f.Fuzz(func(t *testing.T, prog []byte) {
		if len(prog) > 400 {
			prog = prog[:400]
		}
		h := newHarness(t)
		for pc := 0; pc < len(prog); {
			op, n := h.decode(prog[pc:])
			pc += n
			h.step(op)
		}
		h.finish()
	})
}

// fuzzOp is one decoded operation.
type fuzzOp struct {
	kind     int
	path     string // the object, "dir/name"
	other    string // a second path (rename, link)
	arg      int
	data     []byte
	describe string
}

var (
	fuzzNames   = []string{"a", "b", "c", "..", ".", "x/y"}
	fuzzDirs    = []string{"", "a", "b", "a/b", "b/a", "c"}
	fuzzTargets = []string{"/", "..", "../..", "a", "b/c", "/proc/self/root/etc"} // plus the outside dir
)

type harness struct {
	t       *testing.T
	l       *Layer
	host    string
	hostFd  int
	outside string
	before  string
	steps   []string
}

func newHarness(t *testing.T) *harness {
	l := newLayer(t, 8<<20)
	h := &harness{t: t, l: l, host: t.TempDir(), outside: t.TempDir()}
	os.WriteFile(filepath.Join(h.outside, "secret"), []byte("host data"), 0o600)
	os.Mkdir(filepath.Join(h.outside, "a"), 0o755)
	h.before = snapshot(t, h.outside)
	fd, err := unix.Open(h.host, unix.O_PATH|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	h.hostFd = fd
	t.Cleanup(func() { unix.Close(fd) })
	return h
}

func (h *harness) decode(b []byte) (fuzzOp, int) {
	at := func(i int) int {
		if i < len(b) {
			return int(b[i])
		}
		return 0
	}
	path := func(i int) string {
		d := fuzzDirs[at(i)%len(fuzzDirs)]
		n := fuzzNames[at(i+1)%len(fuzzNames)]
		if d == "" {
			return n
		}
		return d + "/" + n
	}
	op := fuzzOp{kind: at(0) % 14, path: path(1), other: path(3), arg: at(5)}
	size := 6
	switch op.kind {
	case 1, 2, 13:
		op.data = bytes.Repeat([]byte{byte('A' + op.arg%26)}, 1+op.arg*37%5000)
	}
	op.describe = fmt.Sprintf("op%d(%q, %q, %d, %dB)", op.kind, op.path, op.other, op.arg, len(op.data))
	return op, size
}

// result is what one side of an operation produced.
type result struct {
	err  error
	data string
}

func (r result) String() string { return fmt.Sprintf("{%v %q}", r.err, r.data) }

func (h *harness) step(op fuzzOp) {
	h.steps = append(h.steps, op.describe)
	got, want := h.onMemfs(op), h.onHost(op)
	if got.err != want.err || got.data != want.data {
		h.t.Fatalf("%s: memfs %v, host %v\nsteps:\n  %s", op.describe, got, want, strings.Join(h.steps, "\n  "))
	}
}

// ---- memfs side ----

// walk resolves path's parent on memfs, returning the parent's inode, the
// final name and the references to drop.
func (h *harness) walk(path string) (uint64, string, []uint64, error) {
	dir, name := splitPath(path)
	ino := vfs.RootIno
	var refs []uint64
	if dir != "" {
		for _, c := range strings.Split(dir, "/") {
			e, err := h.l.Lookup(ino, c)
			if err != nil {
				return 0, "", refs, err
			}
			refs = append(refs, e.Ino())
			ino = e.Ino()
		}
	}
	return ino, name, refs, nil
}

func splitPath(path string) (dir, name string) {
	// Names from the pool may hold a slash ("x/y"); they are one name.
	for _, n := range fuzzNames {
		if strings.HasSuffix(path, "/"+n) {
			return strings.TrimSuffix(path, "/"+n), n
		}
		if path == n {
			return "", n
		}
	}
	panic("bad path " + path)
}

func (h *harness) onMemfs(op fuzzOp) (r result) {
	l := h.l
	var drop []uint64
	defer func() {
		for _, ino := range drop {
			l.Forget(ino, 1)
		}
	}()
	parent, name, refs, err := h.walk(op.path)
	drop = refs
	if err != nil {
		return result{err: err}
	}
	lookup := func() (uint64, error) {
		e, err := l.Lookup(parent, name)
		if err != nil {
			return 0, err
		}
		drop = append(drop, e.Ino())
		return e.Ino(), nil
	}
	keep := func(e vfs.Entry, err error) result {
		if err == nil {
			drop = append(drop, e.Ino())
		}
		return result{err: err}
	}
	switch op.kind {
	case 0:
		return keep(l.Mkdir(parent, name, 0o755, vfs.Root))
	case 1:
		e, f, err := l.Create(parent, name, unix.O_RDWR|unix.O_EXCL, 0o644, vfs.Root, vfs.OpenOptions{Direct: true})
		if err != nil {
			return result{err: err}
		}
		drop = append(drop, e.Ino())
		defer f.Release()
		_, err = f.WriteAt(op.data, 0, false)
		return result{err: err}
	case 2, 3, 9:
		ino, err := lookup()
		if err != nil {
			return result{err: err}
		}
		flags := unix.O_RDWR
		if op.kind == 9 {
			flags = unix.O_RDONLY
		}
		f, err := l.Open(ino, flags, vfs.OpenOptions{})
		if err != nil {
			return result{err: err}
		}
		defer f.Release()
		switch op.kind {
		case 2:
			_, err = f.WriteAt(op.data, int64(op.arg*97), false)
			return result{err: err}
		case 3:
			_, err = l.SetAttr(ino, f, vfs.SetAttr{Valid: vfs.SetSize, Size: int64(op.arg * 53)})
			return result{err: err}
		}
		buf := make([]byte, 16<<10)
		n, err := f.ReadAt(buf, 0)
		return result{err: err, data: string(buf[:n])}
	case 4:
		return result{err: l.Unlink(parent, name)}
	case 5:
		return result{err: l.Rmdir(parent, name)}
	case 6, 8:
		np, nname, nrefs, err := h.walk(op.other)
		drop = append(drop, nrefs...)
		if err != nil {
			return result{err: err}
		}
		if op.kind == 6 {
			return result{err: l.Rename(parent, name, np, nname, renameFlags(op.arg))}
		}
		ino, err := lookup()
		if err != nil {
			return result{err: err}
		}
		return keep(l.Link(ino, np, nname))
	case 7:
		return keep(l.Symlink(parent, name, h.target(op.arg), vfs.Root))
	case 10:
		ino, err := lookup()
		if err != nil {
			return result{err: err}
		}
		st, err := l.GetAttr(ino)
		return result{err: err, data: describeStat(&st)}
	case 11:
		ino, err := lookup()
		if err != nil {
			return result{err: err}
		}
		d, err := l.OpenDir(ino)
		if err != nil {
			return result{err: err}
		}
		defer d.Close()
		var names []string
		err = d.ReadDir(0, func(e *vfs.DirEntry) bool {
			if e.Name != "." && e.Name != ".." {
				names = append(names, e.Name)
			}
			return true
		})
		sort.Strings(names)
		return result{err: err, data: strings.Join(names, ",")}
	case 12:
		ino, err := lookup()
		if err != nil {
			return result{err: err}
		}
		_, err = l.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: uint32(op.arg) & 0o777})
		return result{err: err}
	case 13:
		ino, err := lookup()
		if err != nil {
			return result{err: err}
		}
		if err := l.SetXattr(ino, "user.k", op.data[:op.arg%64], 0); err != nil {
			return result{err: err}
		}
		buf := make([]byte, 128)
		n, err := l.GetXattr(ino, "user.k", buf)
		return result{err: err, data: string(buf[:n])}
	}
	return result{}
}

func renameFlags(arg int) uint32 {
	return []uint32{0, 0, vfs.RenameNoReplace, vfs.RenameExchange}[arg%4]
}

func (h *harness) target(arg int) string {
	if arg%(len(fuzzTargets)+1) == len(fuzzTargets) {
		return h.outside
	}
	return fuzzTargets[arg%(len(fuzzTargets)+1)]
}

func describeStat(st *unix.Stat_t) string {
	size := st.Size
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		size = 0 // directory sizes differ between file systems
	}
	return fmt.Sprintf("mode %o nlink %d uid %d gid %d size %d", st.Mode, st.Nlink, st.Uid, st.Gid, size)
}

// ---- host side: the oracle ----

// hostParent walks to path's parent beneath the host root as memfs walks:
// every component but the last must be a directory, the last need only
// exist (an operation in it then fails as the syscall says). No symlink is
// followed. The returned descriptor is O_PATH.
func (h *harness) hostParent(path string) (int, string, error) {
	dir, name := splitPath(path)
	if dir == "" {
		fd, err := unix.Dup(h.hostFd)
		return fd, name, Errno(err)
	}
	parent, last := ".", dir
	if i := strings.LastIndex(dir, "/"); i >= 0 {
		parent, last = dir[:i], dir[i+1:]
	}
	pfd, err := unix.Openat2(h.hostFd, parent, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
		Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS,
	})
	if err == unix.ELOOP {
		err = unix.ENOTDIR // memfs: a symlink is not a directory to walk into
	}
	if err != nil {
		return -1, "", Errno(err)
	}
	defer unix.Close(pfd)
	fd, err := unix.Openat(pfd, last, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	return fd, name, Errno(err)
}

func (h *harness) onHost(op fuzzOp) result {
	pfd, name, err := h.hostParent(op.path)
	if err != nil {
		return result{err: err}
	}
	defer unix.Close(pfd)
	if op.kind != 6 && op.kind != 8 {
		if err := CheckName(name); err != nil {
			return result{err: err}
		}
	}
	open := func(flags int) (int, error) {
		fd, err := unix.Openat(pfd, name, flags|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err == unix.ELOOP {
			return -1, syscall.EINVAL // memfs opens no symlink
		}
		return fd, err
	}
	switch op.kind {
	case 0:
		return result{err: Errno(unix.Mkdirat(pfd, name, 0o755))}
	case 1:
		fd, err := unix.Openat(pfd, name, unix.O_RDWR|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW, 0o644)
		if err != nil {
			return result{err: Errno(err)}
		}
		defer unix.Close(fd)
		_, err = unix.Pwrite(fd, op.data, 0)
		return result{err: Errno(err)}
	case 2, 3, 9:
		flags := unix.O_RDWR
		if op.kind == 9 {
			flags = unix.O_RDONLY
		}
		fd, err := open(flags)
		if err != nil {
			return result{err: Errno(err)}
		}
		defer unix.Close(fd)
		switch op.kind {
		case 2:
			_, err = unix.Pwrite(fd, op.data, int64(op.arg*97))
			return result{err: Errno(err)}
		case 3:
			return result{err: Errno(unix.Ftruncate(fd, int64(op.arg*53)))}
		}
		buf := make([]byte, 16<<10)
		n, err := unix.Pread(fd, buf, 0)
		if err != nil {
			return result{err: Errno(err)}
		}
		return result{data: string(buf[:n])}
	case 4:
		return result{err: Errno(unix.Unlinkat(pfd, name, 0))}
	case 5:
		return result{err: Errno(unix.Unlinkat(pfd, name, unix.AT_REMOVEDIR))}
	case 6, 8:
		npfd, nname, err := h.hostParent(op.other)
		if err != nil {
			return result{err: err}
		}
		defer unix.Close(npfd)
		if err := CheckName(name); err != nil {
			return result{err: err}
		}
		if op.kind == 6 {
			if err := CheckName(nname); err != nil {
				return result{err: err}
			}
			return result{err: Errno(unix.Renameat2(pfd, name, npfd, nname, uint(renameFlags(op.arg))))}
		}
		// memfs: look the source up, then link it.
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return result{err: Errno(err)}
		}
		if err := CheckName(nname); err != nil {
			return result{err: err}
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return result{err: syscall.EPERM}
		}
		return result{err: Errno(unix.Linkat(pfd, name, npfd, nname, 0))}
	case 7:
		return result{err: Errno(unix.Symlinkat(h.target(op.arg), pfd, name))}
	case 10:
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return result{err: Errno(err)}
		}
		return result{data: describeStat(&st)}
	case 11:
		fd, err := unix.Openat(pfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW, 0)
		if err == unix.ELOOP {
			err = unix.ENOTDIR
		}
		if err != nil {
			return result{err: Errno(err)}
		}
		dir := os.NewFile(uintptr(fd), name)
		defer dir.Close()
		names, err := dir.Readdirnames(-1)
		sort.Strings(names)
		return result{err: Errno(err), data: strings.Join(names, ",")}
	case 12:
		var st unix.Stat_t
		if err := unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return result{err: Errno(err)}
		}
		if st.Mode&unix.S_IFMT == unix.S_IFLNK {
			return result{err: syscall.EOPNOTSUPP}
		}
		return result{err: Errno(unix.Fchmodat(pfd, name, uint32(op.arg)&0o777, 0))}
	case 13:
		fd, err := unix.Openat(pfd, name, unix.O_PATH|unix.O_NOFOLLOW, 0)
		if err != nil {
			return result{err: Errno(err)}
		}
		defer unix.Close(fd)
		p := procPath(fd)
		if err := unix.Setxattr(p, "user.k", op.data[:op.arg%64], 0); err != nil {
			return result{err: Errno(err)}
		}
		buf := make([]byte, 128)
		n, err := unix.Getxattr(p, "user.k", buf)
		return result{err: Errno(err), data: string(buf[:max(n, 0)])}
	}
	return result{}
}

func (h *harness) finish() {
	t := h.t
	if got, want := treeOf(t, h.l.Dir()), treeOf(t, h.host); got != want {
		t.Fatalf("trees differ\nmemfs:\n%s\nhost:\n%s\nsteps:\n  %s", got, want, strings.Join(h.steps, "\n  "))
	}
	if after := snapshot(t, h.outside); after != h.before {
		t.Fatalf("outside the volume changed\nsteps:\n  %s", strings.Join(h.steps, "\n  "))
	}
	if err := h.l.CheckInvariants(); err != nil {
		t.Fatal(err)
	}
	h.l.mu.Lock()
	left := len(h.l.inodes)
	h.l.mu.Unlock()
	if left != 1 {
		t.Fatalf("%d inodes still referenced after every reference was dropped", left)
	}
}

// treeOf describes a tree: relative names, types, modes, sizes, contents
// and link targets, in a stable order.
func treeOf(t *testing.T, root string) string {
	var lines []string
	err := filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, p)
		if rel == "." {
			return nil // the roots differ by construction
		}
		line := rel + " " + fi.Mode().String()
		switch {
		case fi.Mode().IsRegular():
			data, _ := os.ReadFile(p)
			line += fmt.Sprintf(" %d %x", len(data), data[:min(len(data), 16)])
		case fi.Mode()&os.ModeSymlink != 0:
			target, _ := os.Readlink(p)
			line += " -> " + target
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		t.Fatal(err)
	}
	sort.Strings(lines)
	return strings.Join(lines, "\n")
}
