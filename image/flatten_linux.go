package image

import (
	"archive/tar"
	"errors"
	"fmt"
	"io"
	"os"
	"path"
	"sort"
	"strings"
	"time"

	"golang.org/x/sys/unix"
)

// OCI whiteout names (image-spec layer.md).
const (
	whiteoutPrefix = ".wh."
	whiteoutOpaque = ".wh..wh..opq"
)

// resolveStrict is how every path of an image is resolved beneath the tree
// being built: never through a symlink, never out of the tree.
const resolveStrict = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS | unix.RESOLVE_NO_XDEV

// flattener applies layer tar streams, bottom layer first, to a directory
// tree. All filesystem access goes through the directory file descriptor of
// the tree root and openat2 with resolveStrict, so an entry can neither
// follow a symlink planted by an earlier entry nor leave the tree.
//
// A flattener is used by one goroutine.
type flattener struct {
	// root is an O_PATH descriptor of the tree root. Immutable.
	root int
	// chown says whether to keep ownership (needs CAP_CHOWN). Immutable.
	chown bool

	// layer holds the paths created by the layer being applied and all
	// their ancestors; whiteouts and opaque markers only remove what is
	// not in it (what lower layers made).
	layer map[string]struct{}
	// dirTimes holds the mtime of every directory entry seen; they are set
	// last, once no more entries can change them.
	dirTimes map[string]time.Time

	// cachedDir and cachedFd are the last parent directory opened, kept
	// while consecutive entries share it. Invariant: cachedFd is -1 or an
	// open O_PATH descriptor of cachedDir; any removal resets it.
	cachedDir string
	cachedFd  int

	// buf is the copy buffer for file contents.
	buf []byte

	// lim bounds what the image may make. Immutable.
	lim limits
	// written counts the bytes of file contents written, files the
	// entries seen (tar headers of all layers and the directories made
	// for them), over all layers.
	// Invariant: written <= lim.bytes and files <= lim.files where set.
	written, files int64
	// nextDiskCheck is the value of written at which lim.diskFree is
	// asked next.
	nextDiskCheck int64

	// Skipped counts entries not recreated (device nodes, unknown types,
	// xattrs the filesystem refused).
	Skipped int
}

// limits bound what flattening one image may make the node spend. A zero
// field is no limit.
type limits struct {
	// bytes bounds the file contents written, counted as they are
	// written (so an entry that a later layer replaces still counts).
	bytes int64
	// bytesWhy names the bound bytes comes from, for the error.
	bytesWhy string
	// files bounds the entries: tar headers of all layers (whiteouts and
	// skipped entries too) and the directories made for them.
	files int64
	// pathLen bounds the length of an entry's name and link target.
	pathLen int
	// diskFree, if set, is asked every diskCheckEvery bytes written for
	// an error if the disk is running out of room.
	diskFree func() error
}

// diskCheckEvery is how many bytes are written between two diskFree
// checks.
const diskCheckEvery = 16 << 20

// newFlattener starts flattening into the existing, empty directory dir,
// within lim.
func newFlattener(dir string, lim limits) (*flattener, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return nil, &os.PathError{Op: "open", Path: dir, Err: err}
	}
	return &flattener{
		root:          fd,
		chown:         os.Geteuid() == 0,
		dirTimes:      make(map[string]time.Time),
		cachedFd:      -1,
		buf:           make([]byte, 1<<20),
		lim:           lim,
		nextDiskCheck: diskCheckEvery,
	}, nil
}

// Close releases the flattener's descriptors.
func (f *flattener) Close() {
	f.dropCache()
	if f.root >= 0 {
		unix.Close(f.root)
		f.root = -1
	}
}

func (f *flattener) dropCache() {
	if f.cachedFd >= 0 {
		unix.Close(f.cachedFd)
	}
	f.cachedFd, f.cachedDir = -1, ""
}

// unsafef returns an ErrUnsafe error.
func unsafef(format string, args ...any) error {
	return fmt.Errorf("%w: %s", ErrUnsafe, fmt.Sprintf(format, args...))
}

// cleanPath turns a tar entry name into a path relative to the root ("" for
// the root itself). It rejects absolute names and any ".." component rather
// than resolving them.
func cleanPath(name string) (string, error) {
	if strings.HasPrefix(name, "/") {
		return "", unsafef("absolute path %q", name)
	}
	if strings.IndexByte(name, 0) >= 0 {
		return "", unsafef("NUL in path %q", name)
	}
	var parts []string
	for _, p := range strings.Split(name, "/") {
		switch p {
		case "", ".":
			continue
		case "..":
			return "", unsafef("path %q has a .. component", name)
		}
		parts = append(parts, p)
	}
	return strings.Join(parts, "/"), nil
}

// split returns the parent directory ("" for the root) and base name of a
// clean, non-empty path.
func split(p string) (string, string) {
	i := strings.LastIndexByte(p, '/')
	if i < 0 {
		return "", p
	}
	return p[:i], p[i+1:]
}

// openDir returns an O_PATH descriptor of the directory dir (clean,
// relative; "" is the root), creating missing directories (mode 0755) if
// create is set. The caller must not close it: it is owned by the cache.
// A component that is a symlink or not a directory is ErrUnsafe; a missing
// one without create is ENOENT.
func (f *flattener) openDir(dir string, create bool) (int, error) {
	if f.cachedFd >= 0 && f.cachedDir == dir {
		return f.cachedFd, nil
	}
	f.dropCache()
	fd, err := f.openat2(dir)
	if errors.Is(err, unix.ENOENT) && create {
		fd, err = f.mkdirAll(dir)
	}
	if err != nil {
		return -1, err
	}
	f.cachedFd, f.cachedDir = fd, dir
	return fd, nil
}

// openat2 opens dir beneath the root, following no symlink.
func (f *flattener) openat2(dir string) (int, error) {
	if dir == "" {
		dir = "."
	}
	how := unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW, Resolve: resolveStrict}
	for {
		fd, err := unix.Openat2(f.root, dir, &how)
		switch {
		case err == nil:
			return fd, nil
		case err == unix.EINTR || err == unix.EAGAIN:
			continue
		case err == unix.ELOOP || err == unix.EXDEV:
			return -1, unsafef("path %q goes through a symlink or out of the tree", dir)
		case err == unix.ENOTDIR:
			return -1, unsafef("path %q: a parent is not a directory", dir)
		}
		return -1, err
	}
}

// mkdirAll creates the missing directories of dir one component at a time
// and returns a descriptor of dir.
func (f *flattener) mkdirAll(dir string) (int, error) {
	fd, err := unix.Dup(f.root)
	if err != nil {
		return -1, err
	}
	done := ""
	for _, name := range strings.Split(dir, "/") {
		err := unix.Mkdirat(fd, name, 0o755)
		if err != nil && err != unix.EEXIST {
			unix.Close(fd)
			return -1, fmt.Errorf("mkdir %q: %w", path.Join(done, name), err)
		}
		if err == nil {
			f.markLayer(path.Join(done, name))
			if err := f.countFile(); err != nil {
				unix.Close(fd)
				return -1, err
			}
		}
		how := unix.OpenHow{Flags: unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW, Resolve: resolveStrict}
		next, err := unix.Openat2(fd, name, &how)
		unix.Close(fd)
		if err != nil {
			if err == unix.ELOOP || err == unix.ENOTDIR || err == unix.EXDEV {
				return -1, unsafef("path %q: %q is a symlink or not a directory", dir, path.Join(done, name))
			}
			return -1, err
		}
		fd = next
		done = path.Join(done, name)
	}
	return fd, nil
}

// markLayer records p and its ancestors as made by the current layer.
func (f *flattener) markLayer(p string) {
	for p != "" {
		if _, ok := f.layer[p]; ok {
			return
		}
		f.layer[p] = struct{}{}
		p, _ = split(p)
	}
}

// ApplyLayer applies one uncompressed layer tar stream. Errors from r are
// returned as they are (wrapped); errors in the tar format are ErrCorrupt;
// unsafe content is ErrUnsafe.
func (f *flattener) ApplyLayer(r io.Reader) error {
	f.layer = make(map[string]struct{})
	tr := tar.NewReader(r)
	for {
		hdr, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return tarError(err)
		}
		if err := f.apply(hdr, tr); err != nil {
			return err
		}
	}
}

// tarError marks a tar decoding error as corrupt content, unless it came
// from the stream below (the network, the decompressor: those are
// classified by the caller).
func tarError(err error) error {
	var se *sourceError
	if errors.As(err, &se) {
		return err
	}
	if errors.Is(err, tar.ErrHeader) || errors.Is(err, tar.ErrFieldTooLong) || errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, tar.ErrInsecurePath) {
		return fmt.Errorf("%w: layer tar: %w", ErrCorrupt, err)
	}
	return err
}

// countFile counts one more entry against lim.files.
func (f *flattener) countFile() error {
	f.files++
	if f.lim.files > 0 && f.files > f.lim.files {
		return fmt.Errorf("%w: more than %d files and directories (the limit of entries per image)", ErrTooLarge, f.lim.files)
	}
	return nil
}

// checkPath checks an entry's name or link target against lim.pathLen
// (ErrTooLarge) and the kernel's NAME_MAX (ErrUnsafe), which the image
// could otherwise turn into an unclassified ENAMETOOLONG.
func (f *flattener) checkPath(what, p string) error {
	if f.lim.pathLen > 0 && len(p) > f.lim.pathLen {
		return fmt.Errorf("%w: %s of %d bytes, longer than %d (the limit of path length)", ErrTooLarge, what, len(p), f.lim.pathLen)
	}
	if what != "symlink target" {
		for _, el := range strings.Split(p, "/") {
			if len(el) > unix.NAME_MAX {
				// No file system here could hold it: the image is
				// unusable, not too big (FailedPrecondition).
				return fmt.Errorf("%w: %s with a name of %d bytes, longer than %d (the limit of a file name)", ErrUnsafe, what, len(el), unix.NAME_MAX)
			}
		}
	}
	return nil
}

// contentWriter writes file contents within lim.bytes. Having no
// ReadFrom, it also makes io.CopyBuffer use the flattener's buffer
// instead of probing splice/sendfile on a pipe-less source.
type contentWriter struct {
	f    *flattener
	file *os.File
}

func (w contentWriter) Write(p []byte) (int, error) {
	f := w.f
	if f.lim.bytes > 0 && f.written+int64(len(p)) > f.lim.bytes {
		return 0, f.tooLarge()
	}
	n, err := w.file.Write(p)
	f.written += int64(n)
	if err == nil && f.lim.diskFree != nil && f.written >= f.nextDiskCheck {
		f.nextDiskCheck = f.written + diskCheckEvery
		err = f.lim.diskFree()
	}
	return n, err
}

// tooLarge is the error of an image whose contents pass lim.bytes.
func (f *flattener) tooLarge() error {
	return fmt.Errorf("%w: more than %d bytes uncompressed (%s)", ErrTooLarge, f.lim.bytes, f.lim.bytesWhy)
}

// apply applies one tar entry.
func (f *flattener) apply(hdr *tar.Header, tr io.Reader) error {
	if err := f.countFile(); err != nil {
		return err
	}
	if err := f.checkPath("path", hdr.Name); err != nil {
		return err
	}
	if hdr.Typeflag == tar.TypeSymlink {
		if err := f.checkPath("symlink target", hdr.Linkname); err != nil {
			return err
		}
	} else if hdr.Typeflag == tar.TypeLink {
		if err := f.checkPath("hard link target", hdr.Linkname); err != nil {
			return err
		}
	}
	p, err := cleanPath(hdr.Name)
	if err != nil {
		return err
	}
	if p == "" {
		// The root itself: its metadata stays as the cache made it.
		return nil
	}
	dir, base := split(p)
	if strings.HasPrefix(base, whiteoutPrefix) {
		return f.whiteout(dir, base)
	}
	switch hdr.Typeflag {
	case tar.TypeChar, tar.TypeBlock, tar.TypeXGlobalHeader:
		f.Skipped++
		return nil
	case tar.TypeDir, tar.TypeReg, tar.TypeRegA, tar.TypeLink, tar.TypeSymlink, tar.TypeFifo:
	default:
		f.Skipped++
		return nil
	}
	pfd, err := f.openDir(dir, true)
	if err != nil {
		return err
	}
	f.markLayer(p)

	switch hdr.Typeflag {
	case tar.TypeDir:
		var st unix.Stat_t
		err := unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW)
		if err == nil && st.Mode&unix.S_IFMT != unix.S_IFDIR {
			if err := f.removeAllAt(pfd, base); err != nil {
				return err
			}
			err = unix.ENOENT
		}
		if err == unix.ENOENT {
			if err := unix.Mkdirat(pfd, base, 0o700); err != nil {
				return fmt.Errorf("mkdir %q: %w", p, err)
			}
		} else if err != nil {
			return fmt.Errorf("stat %q: %w", p, err)
		}
		// Keep the directory's mode, owner and xattrs through a real fd.
		fd, err := unix.Openat(pfd, base, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %q: %w", p, err)
		}
		err = f.setMeta(fd, hdr, p, false)
		unix.Close(fd)
		if err != nil {
			return err
		}
		f.dirTimes[p] = hdr.ModTime
		return nil

	case tar.TypeReg, tar.TypeRegA:
		if f.lim.bytes > 0 && hdr.Size > f.lim.bytes-f.written {
			return f.tooLarge()
		}
		if err := f.removeExisting(pfd, base); err != nil {
			return err
		}
		fd, err := unix.Openat(pfd, base, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0o600)
		if err != nil {
			return fmt.Errorf("create %q: %w", p, err)
		}
		file := os.NewFile(uintptr(fd), p)
		_, err = io.CopyBuffer(contentWriter{f, file}, tr, f.buf)
		if err == nil {
			err = f.setMeta(fd, hdr, p, true)
		}
		file.Close()
		if err != nil {
			return tarError(err)
		}
		return nil

	case tar.TypeLink:
		target, err := cleanPath(hdr.Linkname)
		if err != nil {
			return err
		}
		if target == "" {
			return unsafef("hard link %q to the root", p)
		}
		tdir, tbase := split(target)
		tfd, err := f.openat2(tdir)
		if err != nil {
			if errors.Is(err, unix.ENOENT) {
				return unsafef("hard link %q to missing %q", p, target)
			}
			return err
		}
		defer unix.Close(tfd)
		var st unix.Stat_t
		if err := unix.Fstatat(tfd, tbase, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
			return unsafef("hard link %q to missing %q", p, target)
		}
		if st.Mode&unix.S_IFMT == unix.S_IFDIR {
			return unsafef("hard link %q to directory %q", p, target)
		}
		if target == p {
			return nil
		}
		if err := f.removeExisting(pfd, base); err != nil {
			return err
		}
		// Flags 0: a link to a symlink links the symlink itself.
		if err := unix.Linkat(tfd, tbase, pfd, base, 0); err != nil {
			return fmt.Errorf("link %q to %q: %w", p, target, err)
		}
		return nil

	case tar.TypeSymlink:
		if err := f.removeExisting(pfd, base); err != nil {
			return err
		}
		if hdr.Linkname == "" || strings.IndexByte(hdr.Linkname, 0) >= 0 {
			return unsafef("symlink %q with an invalid target", p)
		}
		// The target is stored as it is: nothing here ever follows it, and
		// whoever serves the tree resolves it beneath the root.
		if err := unix.Symlinkat(hdr.Linkname, pfd, base); err != nil {
			return fmt.Errorf("symlink %q: %w", p, err)
		}
		if f.chown {
			if err := unix.Fchownat(pfd, base, hdr.Uid, hdr.Gid, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return fmt.Errorf("chown %q: %w", p, err)
			}
		}
		return f.setTimesAt(pfd, base, hdr.ModTime)

	case tar.TypeFifo:
		if err := f.removeExisting(pfd, base); err != nil {
			return err
		}
		if err := unix.Mknodat(pfd, base, unix.S_IFIFO|0o600, 0); err != nil {
			return fmt.Errorf("mkfifo %q: %w", p, err)
		}
		fd, err := unix.Openat(pfd, base, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %q: %w", p, err)
		}
		defer unix.Close(fd)
		if f.chown {
			if err := unix.Fchownat(fd, "", hdr.Uid, hdr.Gid, unix.AT_EMPTY_PATH); err != nil {
				return fmt.Errorf("chown %q: %w", p, err)
			}
		}
		if err := unix.Fchmodat(pfd, base, uint32(hdr.Mode)&0o7777, 0); err != nil {
			return fmt.Errorf("chmod %q: %w", p, err)
		}
		return f.setTimesAt(pfd, base, hdr.ModTime)
	}
	return nil
}

// setMeta sets owner, mode, xattrs and (for files) mtime on fd, an open
// descriptor of the entry p. Owner first: chown clears set-id bits.
func (f *flattener) setMeta(fd int, hdr *tar.Header, p string, times bool) error {
	if f.chown {
		if err := unix.Fchown(fd, hdr.Uid, hdr.Gid); err != nil {
			return fmt.Errorf("chown %q: %w", p, err)
		}
	}
	if err := unix.Fchmod(fd, modeBits(hdr.Mode)); err != nil {
		return fmt.Errorf("chmod %q: %w", p, err)
	}
	for k, v := range hdr.PAXRecords {
		name, ok := strings.CutPrefix(k, "SCHILY.xattr.")
		if !ok || !keepXattr(name) {
			continue
		}
		if err := unix.Fsetxattr(fd, name, []byte(v), 0); err != nil {
			if err == unix.ENOTSUP || err == unix.EPERM || err == unix.EINVAL || err == unix.E2BIG || err == unix.ERANGE {
				f.Skipped++
				continue
			}
			return fmt.Errorf("setxattr %q on %q: %w", name, p, err)
		}
	}
	if times {
		ts := []unix.Timespec{unix.NsecToTimespec(hdr.ModTime.UnixNano()), unix.NsecToTimespec(hdr.ModTime.UnixNano())}
		if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH); err != nil {
			// Fall back for kernels without AT_EMPTY_PATH utimensat.
			tv := []unix.Timeval{unix.NsecToTimeval(hdr.ModTime.UnixNano()), unix.NsecToTimeval(hdr.ModTime.UnixNano())}
			if err := unix.Futimes(fd, tv); err != nil {
				return fmt.Errorf("utimes %q: %w", p, err)
			}
		}
	}
	return nil
}

// modeBits converts a tar mode to the permission and set-id bits chmod
// takes.
func modeBits(m int64) uint32 {
	return uint32(m) & 0o7777
}

// keepXattr says which extended attributes of an image are recreated:
// user.* and security.* (file capabilities) except SELinux labels, which
// belong to the host's policy. trusted.* and system.* are dropped: they
// are the overlay's and the kernel's namespaces.
func keepXattr(name string) bool {
	switch {
	case strings.HasPrefix(name, "user."):
		return true
	case name == "security.selinux":
		return false
	case strings.HasPrefix(name, "security."):
		return true
	}
	return false
}

// setTimesAt sets the mtime (and atime) of name in dirfd, not following it.
func (f *flattener) setTimesAt(dirfd int, name string, t time.Time) error {
	ts := []unix.Timespec{unix.NsecToTimespec(t.UnixNano()), unix.NsecToTimespec(t.UnixNano())}
	if err := unix.UtimesNanoAt(dirfd, name, ts, unix.AT_SYMLINK_NOFOLLOW); err != nil && err != unix.ENOENT {
		return fmt.Errorf("utimes %q: %w", name, err)
	}
	return nil
}

// whiteout applies a whiteout entry dir/base: base is ".wh..wh..opq" (hide
// everything lower layers put in dir) or ".wh.NAME" (hide dir/NAME).
func (f *flattener) whiteout(dir, base string) error {
	if base == whiteoutOpaque {
		pfd, err := f.openDir(dir, true)
		if err != nil {
			return err
		}
		f.markLayer(dir)
		// Work on a private descriptor: removals reset the cache.
		fd, err := unix.Openat(pfd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return err
		}
		f.dropCache()
		defer unix.Close(fd)
		return f.removeLowerIn(fd, dir)
	}
	name := strings.TrimPrefix(base, whiteoutPrefix)
	if name == "" || name == "." || name == ".." {
		return unsafef("bad whiteout %q", path.Join(dir, base))
	}
	target := path.Join(dir, name)
	if _, ok := f.layer[target]; ok {
		// Whiteouts only hide lower layers.
		return nil
	}
	pfd, err := f.openDir(dir, false)
	if errors.Is(err, unix.ENOENT) {
		return nil
	}
	if err != nil {
		return err
	}
	return f.removeAllAt(pfd, name)
}

// removeLowerIn removes every entry under the directory open as dirfd
// (path dir) that the current layer did not make.
func (f *flattener) removeLowerIn(dirfd int, dir string) error {
	names, err := readDirNames(dirfd)
	if err != nil {
		return err
	}
	for _, name := range names {
		child := path.Join(dir, name)
		if _, ok := f.layer[child]; !ok {
			if err := f.removeAllAt(dirfd, name); err != nil {
				return err
			}
			continue
		}
		cfd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err == unix.ENOTDIR || err == unix.ELOOP {
			continue
		}
		if err != nil {
			return err
		}
		err = f.removeLowerIn(cfd, child)
		unix.Close(cfd)
		if err != nil {
			return err
		}
	}
	return nil
}

// readDirNames lists the directory open as fd (an O_RDONLY descriptor,
// left open) by reading a duplicate.
func readDirNames(fd int) ([]string, error) {
	dup, err := unix.Openat(fd, ".", unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	d := os.NewFile(uintptr(dup), ".")
	defer d.Close()
	return d.Readdirnames(-1)
}

// removeExisting removes whatever non-directory or directory tree sits at
// name in dirfd, so a new entry can take its place.
func (f *flattener) removeExisting(dirfd int, name string) error {
	return f.removeAllAt(dirfd, name)
}

// removeAllAt removes name in dirfd and, for a directory, everything under
// it, never following a symlink. A missing name is not an error.
func (f *flattener) removeAllAt(dirfd int, name string) error {
	err := unix.Unlinkat(dirfd, name, 0)
	if err == nil || err == unix.ENOENT {
		return nil
	}
	if err != unix.EISDIR && err != unix.EPERM {
		return fmt.Errorf("remove %q: %w", name, err)
	}
	// A directory. Callers pass the cached directory (or none is
	// cached), so the cache, the parent of what goes, stays valid.
	if err := removeTreeAt(dirfd, name); err != nil {
		return fmt.Errorf("remove %q: %w", name, err)
	}
	return nil
}

// removeTreeAt removes the directory name in dirfd and its contents.
func removeTreeAt(dirfd int, name string) error {
	fd, err := unix.Openat(dirfd, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	names, err := readDirNames(fd)
	if err == nil {
		for _, n := range names {
			err = unix.Unlinkat(fd, n, 0)
			if err == unix.EISDIR || err == unix.EPERM {
				err = removeTreeAt(fd, n)
			}
			if err != nil && err != unix.ENOENT {
				break
			}
			err = nil
		}
	}
	unix.Close(fd)
	if err != nil {
		return err
	}
	return unix.Unlinkat(dirfd, name, unix.AT_REMOVEDIR)
}

// Finish sets the directory mtimes recorded from the layers, deepest
// first, once no entry can change them any more.
func (f *flattener) Finish() error {
	f.dropCache()
	dirs := make([]string, 0, len(f.dirTimes))
	for d := range f.dirTimes {
		dirs = append(dirs, d)
	}
	sort.Slice(dirs, func(i, j int) bool {
		di, dj := strings.Count(dirs[i], "/"), strings.Count(dirs[j], "/")
		if di != dj {
			return di > dj
		}
		return dirs[i] < dirs[j]
	})
	for _, d := range dirs {
		parent, base := split(d)
		pfd, err := f.openat2(parent)
		if err != nil {
			// Removed or replaced by a later layer.
			continue
		}
		var st unix.Stat_t
		if unix.Fstatat(pfd, base, &st, unix.AT_SYMLINK_NOFOLLOW) == nil && st.Mode&unix.S_IFMT == unix.S_IFDIR {
			err = f.setTimesAt(pfd, base, f.dirTimes[d])
		}
		unix.Close(pfd)
		if err != nil {
			return err
		}
	}
	return nil
}

// treeSize returns the disk usage of the tree under dir (allocated blocks,
// each hard-linked inode counted once) and the number of inodes.
func treeSize(dir string) (bytes int64, inodes int64, err error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return 0, 0, err
	}
	defer unix.Close(fd)
	seen := make(map[uint64]struct{})
	var walk func(fd int) error
	walk = func(fd int) error {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return err
		}
		bytes += st.Blocks * 512
		inodes++
		names, err := readDirNames(fd)
		if err != nil {
			return err
		}
		for _, n := range names {
			if err := unix.Fstatat(fd, n, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return err
			}
			if st.Mode&unix.S_IFMT == unix.S_IFDIR {
				cfd, err := unix.Openat(fd, n, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
				if err != nil {
					return err
				}
				err = walk(cfd)
				unix.Close(cfd)
				if err != nil {
					return err
				}
				continue
			}
			if st.Nlink > 1 {
				if _, ok := seen[st.Ino]; ok {
					continue
				}
				seen[st.Ino] = struct{}{}
			}
			bytes += st.Blocks * 512
			inodes++
		}
		return nil
	}
	err = walk(fd)
	return bytes, inodes, err
}
