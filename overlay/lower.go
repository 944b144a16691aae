package overlay

import (
	"strconv"
	"strings"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// Lower is the read-only lower layer of an overlay. Paths name entries
// relative to the layer's root: "" is the root, components are separated by
// single slashes, and no component is "." or "..". A Lower never follows a
// symlink: the final component of a path that is a symlink is the symlink
// itself, and a symlink in the middle of a path is an error (ENOENT,
// ENOTDIR or ELOOP), never a way out of the layer.
//
// Every method returns nil or a bare syscall.Errno. A Lower must not change
// while an overlay uses it.
type Lower interface {
	// Lstat returns the attributes of path.
	//
	// Errors: ENOENT, ENOTDIR (a component is not a directory).
	Lstat(path string) (unix.Stat_t, error)
	// ReadDir returns the entries of the directory path, without "." and
	// "..", in a stable order.
	//
	// Errors: ENOENT, ENOTDIR.
	ReadDir(path string) ([]LowerEntry, error)
	// Readlink returns the target of the symlink path.
	//
	// Errors: ENOENT, EINVAL (not a symlink).
	Readlink(path string) (string, error)
	// ListXattr returns the names of path's extended attributes.
	ListXattr(path string) ([]string, error)
	// GetXattr returns the value of path's extended attribute name.
	//
	// Errors: ENODATA.
	GetXattr(path, name string) ([]byte, error)
	// Open opens the regular file path for reading. It must not open
	// anything else, a device above all, even for a moment.
	//
	// Errors: ENOENT, EISDIR, EINVAL (not a regular file).
	Open(path string) (LowerFile, error)
}

// LowerEntry is one entry of a lower directory.
type LowerEntry struct {
	Name string
	Ino  uint64
	// Type is the entry's DT_* type.
	Type uint8
}

// LowerFile is an open regular file of a Lower.
type LowerFile interface {
	// ReadAt reads at off; a short count with a nil error means end of
	// file.
	ReadAt(p []byte, off int64) (int, error)
	// Fd returns a read-only descriptor of the file that the kernel may
	// read itself (FUSE passthrough), or -1 if the Lower has none; then
	// every read goes through ReadAt.
	Fd() int
	Close() error
}

// joinPath returns the lower path of name in the directory dir.
func joinPath(dir, name string) string {
	if dir == "" {
		return name
	}
	return dir + "/" + name
}

// DirLower is a Lower over a directory tree on a local file system, such as
// an unpacked image. Every path is resolved beneath the root with
// openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS), so a
// symlink inside the tree is never a way out of it. Descriptors of recently
// used directories are kept, so most operations are one system call on the
// parent directory's descriptor.
type DirLower struct {
	// rootFd is an O_PATH descriptor of the root directory. Immutable until
	// Close.
	rootFd int

	// mu protects dirs.
	mu sync.Mutex
	// dirs caches O_PATH descriptors of directories by path.
	// Invariant: len(dirs) <= maxCachedDirs.
	dirs map[string]*cachedDir
}

// cachedDir is a cached directory descriptor.
type cachedDir struct {
	fd int
	// users counts callers using fd; evicted says it left the cache, and
	// the last user closes it. Protected by DirLower.mu.
	users   int
	evicted bool
}

// maxCachedDirs bounds the directory descriptors a DirLower keeps.
const maxCachedDirs = 64

// NewDirLower opens the directory dir as a Lower.
func NewDirLower(dir string) (*DirLower, error) {
	fd, err := unix.Open(dir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, errnoOf(err)
	}
	return &DirLower{rootFd: fd, dirs: map[string]*cachedDir{}}, nil
}

// Close closes the descriptors.
func (d *DirLower) Close() error {
	d.mu.Lock()
	for path, c := range d.dirs {
		c.evicted = true
		if c.users == 0 {
			unix.Close(c.fd)
		}
		delete(d.dirs, path)
	}
	d.mu.Unlock()
	return errnoOf(unix.Close(d.rootFd))
}

const resolveFlags = unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS

// checkPath accepts a relative path of proper components.
func checkPath(path string) error {
	if path == "" {
		return nil
	}
	for _, c := range strings.Split(path, "/") {
		switch c {
		case "", ".", "..":
			return syscall.ENOENT
		}
	}
	return nil
}

// withDir runs fn with an O_PATH descriptor of the directory dir.
func (d *DirLower) withDir(dir string, fn func(fd int) error) error {
	if dir == "" {
		return fn(d.rootFd)
	}
	d.mu.Lock()
	c := d.dirs[dir]
	if c != nil {
		c.users++
	}
	d.mu.Unlock()
	if c == nil {
		fd, err := unix.Openat2(d.rootFd, dir, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW,
			Resolve: resolveFlags,
		})
		switch err {
		case nil:
		case unix.EXDEV, unix.ELOOP:
			// An escape attempt, or a symlink on the way: not in the layer.
			return syscall.ENOENT
		default:
			return errnoOf(err)
		}
		c = &cachedDir{fd: fd, users: 1}
		d.mu.Lock()
		if old := d.dirs[dir]; old != nil {
			unix.Close(fd)
			c = old
			c.users++
		} else {
			if len(d.dirs) >= maxCachedDirs {
				for path, victim := range d.dirs {
					victim.evicted = true
					if victim.users == 0 {
						unix.Close(victim.fd)
					}
					delete(d.dirs, path)
					break
				}
			}
			d.dirs[dir] = c
		}
		d.mu.Unlock()
	}
	err := fn(c.fd)
	d.mu.Lock()
	c.users--
	if c.evicted && c.users == 0 {
		unix.Close(c.fd)
	}
	d.mu.Unlock()
	return err
}

// splitPath returns the directory and last component of path.
func splitPath(path string) (string, string) {
	i := strings.LastIndexByte(path, '/')
	if i < 0 {
		return "", path
	}
	return path[:i], path[i+1:]
}

// at runs fn with the parent directory of path and its last component
// ("" for the root).
func (d *DirLower) at(path string, fn func(dirfd int, name string) error) error {
	if err := checkPath(path); err != nil {
		return err
	}
	if path == "" {
		return fn(d.rootFd, "")
	}
	dir, name := splitPath(path)
	return d.withDir(dir, func(fd int) error { return fn(fd, name) })
}

// openPath opens path beneath the root with flags, never following a
// symlink (O_PATH opens a final symlink itself; other opens of one fail
// with ELOOP).
func (d *DirLower) openPath(path string, flags int) (int, error) {
	fd := -1
	err := d.at(path, func(dirfd int, name string) error {
		if name == "" {
			name = "."
		}
		var err error
		fd, err = unix.Openat2(dirfd, name, &unix.OpenHow{
			Flags:   uint64(flags | unix.O_CLOEXEC | unix.O_NOFOLLOW),
			Resolve: resolveFlags,
		})
		if err == unix.EXDEV {
			return syscall.ENOENT
		}
		return errnoOf(err)
	})
	return fd, err
}

// withPath runs fn with an O_PATH descriptor of path (a symlink itself if
// path names one).
func (d *DirLower) withPath(path string, fn func(fd int) error) error {
	fd, err := d.openPath(path, unix.O_PATH)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return fn(fd)
}

// Lstat implements Lower.Lstat.
func (d *DirLower) Lstat(path string) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := d.at(path, func(dirfd int, name string) error {
		flags := unix.AT_SYMLINK_NOFOLLOW
		if name == "" {
			flags |= unix.AT_EMPTY_PATH
		}
		return errnoOf(unix.Fstatat(dirfd, name, &st, flags))
	})
	return st, err
}

// ReadDir implements Lower.ReadDir.
func (d *DirLower) ReadDir(path string) ([]LowerEntry, error) {
	fd, err := d.openPath(path, unix.O_RDONLY|unix.O_DIRECTORY)
	if err == syscall.ELOOP {
		return nil, syscall.ENOTDIR
	}
	if err != nil {
		return nil, err
	}
	defer unix.Close(fd)
	var out []LowerEntry
	buf := make([]byte, 16384)
	for {
		n, err := unix.Getdents(fd, buf)
		if err != nil {
			return nil, errnoOf(err)
		}
		if n == 0 {
			return out, nil
		}
		for b := buf[:n]; len(b) > 0; {
			reclen := int(nativeUint16(b[16:]))
			name := b[19:reclen]
			for j, c := range name {
				if c == 0 {
					name = name[:j]
					break
				}
			}
			if s := string(name); s != "." && s != ".." {
				out = append(out, LowerEntry{Name: s, Ino: nativeUint64(b[0:]), Type: b[18]})
			}
			b = b[reclen:]
		}
	}
}

// Readlink implements Lower.Readlink.
func (d *DirLower) Readlink(path string) (string, error) {
	var target string
	err := d.at(path, func(dirfd int, name string) error {
		if name == "" {
			return syscall.EINVAL
		}
		buf := make([]byte, unix.PathMax)
		n, err := unix.Readlinkat(dirfd, name, buf)
		if err != nil {
			return errnoOf(err)
		}
		target = string(buf[:n])
		return nil
	})
	return target, err
}

func procPath(fd int) string { return "/proc/self/fd/" + strconv.Itoa(fd) }

// ListXattr implements Lower.ListXattr.
func (d *DirLower) ListXattr(path string) ([]string, error) {
	var names []string
	err := d.withPath(path, func(fd int) error {
		p := procPath(fd)
		for {
			size, err := unix.Listxattr(p, nil)
			if err != nil {
				return errnoOf(err)
			}
			if size == 0 {
				return nil
			}
			buf := make([]byte, size)
			n, err := unix.Listxattr(p, buf)
			if err == unix.ERANGE {
				continue
			}
			if err != nil {
				return errnoOf(err)
			}
			for _, s := range strings.Split(string(buf[:n]), "\x00") {
				if s != "" {
					names = append(names, s)
				}
			}
			return nil
		}
	})
	return names, err
}

// GetXattr implements Lower.GetXattr.
func (d *DirLower) GetXattr(path, name string) ([]byte, error) {
	var val []byte
	err := d.withPath(path, func(fd int) error {
		p := procPath(fd)
		for {
			size, err := unix.Getxattr(p, name, nil)
			if err != nil {
				return errnoOf(err)
			}
			buf := make([]byte, size)
			n, err := unix.Getxattr(p, name, buf)
			if err == unix.ERANGE {
				continue
			}
			if err != nil {
				return errnoOf(err)
			}
			val = buf[:n]
			return nil
		}
	})
	return val, err
}

// Open implements Lower.Open. It checks the type on an O_PATH descriptor
// before it opens the file, so that it never opens a device or a FIFO:
// opening a device may act on the device even where the tree is not
// mounted nodev.
func (d *DirLower) Open(path string) (LowerFile, error) {
	pfd, err := d.openPath(path, unix.O_PATH)
	if err != nil {
		return nil, err
	}
	defer unix.Close(pfd)
	var st unix.Stat_t
	if err := unix.Fstat(pfd, &st); err != nil {
		return nil, errnoOf(err)
	}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		return nil, syscall.EISDIR
	default:
		return nil, syscall.EINVAL
	}
	fd, err := unix.Open(procPath(pfd), unix.O_RDONLY|unix.O_NOATIME|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, errnoOf(err)
	}
	return &dirLowerFile{fd: fd}, nil
}

// dirLowerFile is an open regular file of a DirLower.
type dirLowerFile struct {
	// fd is a read-only descriptor. Immutable until Close.
	fd int
}

func (f *dirLowerFile) ReadAt(p []byte, off int64) (int, error) {
	total := 0
	for total < len(p) {
		n, err := unix.Pread(f.fd, p[total:], off+int64(total))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return total, errnoOf(err)
		}
		if n == 0 {
			break
		}
		total += n
	}
	return total, nil
}

func (f *dirLowerFile) Fd() int { return f.fd }

func (f *dirLowerFile) Close() error { return errnoOf(unix.Close(f.fd)) }
