package overlay

import (
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// File is an open regular file of an overlay. It holds a reference to its
// node until Release. A File opened for writing has copied its node up; a
// read-only one follows its node into the upper layer if another File
// copies it up meanwhile.
type File struct {
	// fs and n are the File's overlay and node. Immutable.
	fs *FS
	n  *node
	// writable says the File may write. Immutable.
	writable bool
	// direct says the caller may move bytes on Fd itself. Immutable.
	direct bool
	// onLower says the File is direct on the lower file's descriptor.
	// Immutable.
	onLower bool

	// mu protects the fields below.
	mu sync.Mutex
	// uf is the open upper file (a *memfs.File), or nil while the File has
	// not needed one.
	uf vfs.File
	// lf is the open lower file, or nil.
	lf LowerFile
}

// Open opens the regular file ino with the access mode and O_TRUNC of
// flags. A write open copies the file up: its metadata, and the bytes of a
// file up to smallFile; a bigger file's bytes follow page by page as they
// are written, and its Files are not Direct. A read-only open of a file
// entirely in the lower offers the lower file's descriptor for passthrough
// when o.Direct.
//
// Errors: EISDIR, EINVAL (not a regular file), EPERM (seals), ENOENT.
func (fs *FS) Open(ino uint64, flags int, o vfs.OpenOptions) (vfs.File, error) {
	f, err := fs.open(ino, flags, o)
	if err != nil {
		return nil, err // a nil vfs.File, not a nil *File
	}
	return f, nil
}

// open is Open with the overlay's own File type.
func (fs *FS) open(ino uint64, flags int, o vfs.OpenOptions) (*File, error) {
	n, err := fs.get(ino)
	if err != nil {
		return nil, err
	}
	switch n.typ {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		return nil, syscall.EISDIR
	default:
		return nil, syscall.EINVAL
	}
	writable := flags&unix.O_ACCMODE != unix.O_RDONLY
	if writable || flags&unix.O_TRUNC != 0 {
		fs.treeMu.Lock()
		defer fs.treeMu.Unlock()
		if err := fs.copyUpLocked(n); err != nil {
			return nil, err
		}
		return fs.openUpperLocked(n, flags, o)
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	return fs.openReadLocked(n, o)
}

// openReadLocked opens the regular file n read-only.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) openReadLocked(n *node, o vfs.OpenOptions) (*File, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	f := &File{fs: fs, n: n}
	switch {
	case n.upper == 0:
		lf, err := fs.lower.Open(n.lowerPath)
		if err != nil {
			return nil, err
		}
		f.lf, f.direct = lf, o.Direct && lf.Fd() >= 0
		if f.direct {
			f.onLower = true
			n.lowerDirect++
		}
	case n.partial:
		uf, err := fs.upper.Open(n.upper, unix.O_RDONLY, vfs.OpenOptions{})
		if err != nil {
			return nil, err
		}
		f.uf = uf
	default:
		o.Direct = o.Direct && n.lowerDirect == 0
		uf, err := fs.upper.Open(n.upper, unix.O_RDONLY, o)
		if err != nil {
			return nil, err
		}
		f.uf, f.direct = uf, uf.Direct()
	}
	fs.ref(n)
	return f, nil
}

// openUpperLocked opens the copied-up node n with flags.
//
// Preconditions:
//   - fs.treeMu is locked for writing; n.upper != 0.
func (fs *FS) openUpperLocked(n *node, flags int, o vfs.OpenOptions) (*File, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	trunc := flags&unix.O_TRUNC != 0
	writable := flags&unix.O_ACCMODE != unix.O_RDONLY
	// A small partial file opened for writing is copied whole now, so the
	// kernel can do its I/O itself.
	whole := n.partial && writable && !trunc && n.limit <= smallFile
	// The kernel serves all passthrough opens of an inode from one backing
	// file: while one reads the lower file, the upper one is not offered.
	o.Direct = o.Direct && n.lowerDirect == 0 && (!n.partial || trunc || whole)
	if n.partial {
		// Writes that copy lower ranges in go to their own offsets. (An
		// append-only file is never partial: SetFlags copies it whole.)
		flags &^= unix.O_APPEND
	}
	if n.partial && trunc {
		// Check the seals before forgetting the lower bytes.
		uf, err := fs.upper.Open(n.upper, flags&^unix.O_TRUNC, vfs.OpenOptions{})
		if err != nil {
			return nil, err
		}
		uf.Release()
	}
	var saved rangeState
	if n.partial && trunc {
		saved = n.saveState()
		n.limit, n.copied = 0, nil
		if err := fs.saveRangesLocked(n); err != nil {
			n.restoreState(saved)
			return nil, err
		}
	}
	uf, err := fs.upper.Open(n.upper, flags, o)
	if err != nil {
		if saved.partial {
			n.restoreState(saved)
			fs.saveRangesLocked(n)
		}
		return nil, err
	}
	f := &File{fs: fs, n: n, uf: uf, writable: writable, direct: uf.Direct()}
	if n.partial {
		lf, err := fs.lower.Open(n.lowerPath)
		if err != nil {
			uf.Release()
			return nil, err
		}
		f.lf = lf
	}
	if whole {
		// Copying is not a change: the file keeps its times.
		err := fs.keepTimes(n.upper, func() error {
			return fs.copyInLocked(n, uf.Fd(), f.lf, 0, n.limit)
		})
		if err != nil {
			uf.Release()
			f.lf.Close()
			return nil, err
		}
	}
	fs.ref(n)
	return f, nil
}

// rangeState is a copy of a node's partial state.
type rangeState struct {
	partial, hasLower bool
	limit             int64
	copied            rangeSet
}

func (n *node) saveState() rangeState {
	return rangeState{n.partial, n.hasLower, n.limit, append(rangeSet(nil), n.copied...)}
}

func (n *node) restoreState(s rangeState) {
	n.partial, n.hasLower, n.limit, n.copied = s.partial, s.hasLower, s.limit, s.copied
}

// Create creates the regular file name in parent and opens it with flags;
// without O_EXCL an existing regular file is opened instead (see
// memfs.Layer.Create).
//
// Errors: as Mkdir and Open.
func (fs *FS) Create(parent uint64, name string, flags int, mode uint32, c vfs.Caller, o vfs.OpenOptions) (vfs.Entry, vfs.File, error) {
	p, err := fs.get(parent)
	if err != nil {
		return vfs.Entry{}, nil, err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if p.typ != unix.S_IFDIR {
		return vfs.Entry{}, nil, syscall.ENOTDIR
	}
	if err := checkName(name); err != nil {
		return vfs.Entry{}, nil, err
	}
	if n, err := fs.lookupLocked(p, name, true); err == nil {
		if flags&unix.O_EXCL != 0 {
			fs.unref(n, 1)
			return vfs.Entry{}, nil, syscall.EEXIST
		}
		var f *File
		switch n.typ {
		case unix.S_IFREG:
			if flags&unix.O_ACCMODE != unix.O_RDONLY || flags&unix.O_TRUNC != 0 {
				err = fs.copyUpLocked(n)
				if err == nil {
					f, err = fs.openUpperLocked(n, flags, o)
				}
			} else {
				f, err = fs.openReadLocked(n, o)
			}
		default:
			err = syscall.EEXIST
		}
		if err != nil {
			fs.unref(n, 1)
			return vfs.Entry{}, nil, err
		}
		e, err := fs.entryOf(n)
		if err != nil {
			f.Release()
			fs.unref(n, 1)
			return vfs.Entry{}, nil, err
		}
		return e, f, nil
	} else if err != syscall.ENOENT {
		return vfs.Entry{}, nil, err
	}
	var uf vfs.File
	n, err := fs.createLocked(p, name, c, false, func(dir uint64, name string, c vfs.Caller, _ uint32) (vfs.Entry, error) {
		e, f, err := fs.upper.Create(dir, name, flags|unix.O_EXCL, mode, c, o)
		uf = f
		return e, err
	})
	if err != nil {
		return vfs.Entry{}, nil, err
	}
	fs.ref(n) // the File's
	f := &File{fs: fs, n: n, uf: uf, writable: flags&unix.O_ACCMODE != unix.O_RDONLY, direct: uf.Direct()}
	e, err := fs.entryOf(n)
	if err != nil {
		f.Release()
		fs.unref(n, 1)
		return vfs.Entry{}, nil, err
	}
	return e, f, nil
}

// Tmpfile creates an unnamed regular file in the directory parent (see
// memfs.Layer.Tmpfile); Link can name it later.
//
// Errors: ENOTDIR, ENOSPC, EINVAL.
func (fs *FS) Tmpfile(parent uint64, flags int, mode uint32, c vfs.Caller, o vfs.OpenOptions) (vfs.Entry, vfs.File, error) {
	p, err := fs.get(parent)
	if err != nil {
		return vfs.Entry{}, nil, err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if p.typ != unix.S_IFDIR {
		return vfs.Entry{}, nil, syscall.ENOTDIR
	}
	if err := fs.copyUpLocked(p); err != nil {
		return vfs.Entry{}, nil, err
	}
	e, uf, err := fs.upper.Tmpfile(p.upper, flags, mode, c, o)
	if err != nil {
		return vfs.Entry{}, nil, err
	}
	n := &node{ino: e.Ino(), typ: unix.S_IFREG, refs: 2, upper: e.Ino()}
	fs.mu.Lock()
	fs.nodes[n.ino] = n
	fs.mu.Unlock()
	f := &File{fs: fs, n: n, uf: uf, writable: true, direct: uf.Direct()}
	e.Stat.Ino = n.ino
	return e, f, nil
}

// Fd returns a descriptor of the file's top layer: the upper file once the
// File uses one, else the lower file's (-1 if the Lower has none).
func (f *File) Fd() int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.uf != nil {
		return f.uf.Fd()
	}
	if f.lf != nil {
		return f.lf.Fd()
	}
	return -1
}

// Direct says whether the caller may read (and, if writable, write) on Fd
// directly. It is true only for a file wholly in one layer when opened.
func (f *File) Direct() bool { return f.direct }

// Handle names the File's upper inode to memfs.Layer.LookupHandle (and
// FindOrphan); ok is false while the file has no upper copy.
func (f *File) Handle() (ino uint64, gen uint32, ok bool) {
	f.mu.Lock()
	uf := f.uf
	f.mu.Unlock()
	if uf != nil {
		// Every upper file is a *memfs.File (memfs returns it as a
		// vfs.File so that a Layer is served with no adapter), whose
		// Handle always names its tmpfs inode: FindOrphan relies on that.
		return uf.(*memfs.File).Handle()
	}
	f.n.mu.Lock()
	up := f.n.upper
	f.n.mu.Unlock()
	if up == 0 {
		return 0, 0, false
	}
	gen, err := f.fs.upper.Gen(up)
	return up, gen, err == nil
}

// upperFile returns the File's upper file, opening it read-only if the node
// was copied up after the File was opened.
//
// Preconditions:
//   - f.n.mu is locked; f.n.upper != 0.
func (f *File) upperFile() (vfs.File, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.uf == nil {
		uf, err := f.fs.upper.Open(f.n.upper, unix.O_RDONLY, vfs.OpenOptions{})
		if err != nil {
			return nil, err
		}
		f.uf = uf
	}
	return f.uf, nil
}

// lowerFile returns the File's lower file, opening it if needed.
//
// Preconditions:
//   - f.n.mu is locked; f.n.hasLower.
func (f *File) lowerFile() (LowerFile, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.lf == nil {
		lf, err := f.fs.lower.Open(f.n.lowerPath)
		if err != nil {
			return nil, err
		}
		f.lf = lf
	}
	return f.lf, nil
}

// ReadAt reads at off; a short count means end of file. Bytes of a partly
// copied-up file come from whichever layer holds them.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	n := f.n
	n.mu.Lock()
	switch {
	case n.upper == 0:
		lf, err := f.lowerFile()
		n.mu.Unlock()
		if err != nil {
			return 0, err
		}
		return lf.ReadAt(p, off)
	case !n.partial:
		uf, err := f.upperFile()
		n.mu.Unlock()
		if err != nil {
			return 0, err
		}
		return uf.ReadAt(p, off)
	}
	defer n.mu.Unlock()
	uf, err := f.upperFile()
	if err != nil {
		return 0, err
	}
	lf, err := f.lowerFile()
	if err != nil {
		return 0, err
	}
	return f.fs.readPartialLocked(n, uf, lf, p, off)
}

// pageRange returns [a, b) widened to whole pages.
func pageRange(a, b int64) (int64, int64) {
	return a &^ (pageSize - 1), (b + pageSize - 1) &^ (pageSize - 1)
}

const pageSize = 4096

// WriteAt writes p at off (see memfs.File.WriteAt). In a partly copied-up
// file the touched pages are copied up first.
func (f *File) WriteAt(p []byte, off int64, kill bool) (int, error) {
	if !f.writable {
		return 0, syscall.EBADF
	}
	if len(p) == 0 {
		return 0, nil
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.partial {
		lf, err := f.lowerFile()
		if err != nil {
			return 0, err
		}
		a, b := pageRange(off, off+int64(len(p)))
		if err := f.fs.copyInLocked(n, f.uf.Fd(), lf, a, b); err != nil {
			return 0, err
		}
	}
	return f.uf.WriteAt(p, off, kill)
}

// Allocate is fallocate(2) (see memfs.File.Allocate). Punching a hole in
// or zeroing a partly copied-up file's range marks it copied; collapsing or
// inserting a range copies the whole file up first.
func (f *File) Allocate(mode uint32, off, length int64) error {
	if !f.writable {
		return syscall.EBADF
	}
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.partial {
		return f.uf.Allocate(mode, off, length)
	}
	lf, err := f.lowerFile()
	if err != nil {
		return err
	}
	if mode&(unix.FALLOC_FL_COLLAPSE_RANGE|unix.FALLOC_FL_INSERT_RANGE) != 0 {
		if err := f.fs.copyInLocked(n, f.uf.Fd(), lf, 0, n.limit); err != nil {
			return err
		}
		return f.uf.Allocate(mode, off, length)
	}
	if mode&(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_ZERO_RANGE) == 0 {
		return f.uf.Allocate(mode, off, length)
	}
	saved := n.saveState()
	n.copied = n.copied.add(off, min(off+length, n.limit))
	if err := f.fs.saveRangesLocked(n); err != nil {
		n.restoreState(saved)
		return err
	}
	if err := f.uf.Allocate(mode, off, length); err != nil {
		n.restoreState(saved)
		f.fs.saveRangesLocked(n)
		return err
	}
	return nil
}

// Seek is lseek(2) for SEEK_DATA and SEEK_HOLE. A partly copied-up file
// reports no holes.
func (f *File) Seek(off int64, whence int) (int64, error) {
	n := f.n
	n.mu.Lock()
	defer n.mu.Unlock()
	if n.upper != 0 && !n.partial {
		uf, err := f.upperFile()
		if err != nil {
			return 0, err
		}
		return uf.Seek(off, whence)
	}
	var size int64
	if n.upper != 0 {
		// Another open copied the file up in part since this File was
		// opened on the lower: it may have no upper file yet.
		uf, err := f.upperFile()
		if err != nil {
			return 0, err
		}
		st, err := uf.Stat()
		if err != nil {
			return 0, err
		}
		size = st.Size
	} else {
		lf, err := f.lowerFile()
		if err != nil {
			return 0, err
		}
		if fd := lf.Fd(); fd >= 0 {
			r, err := unix.Seek(fd, off, whence)
			return r, errnoOf(err)
		}
		st, err := f.fs.lower.Lstat(n.lowerPath)
		if err != nil {
			return 0, err
		}
		size = st.Size
	}
	switch whence {
	case unix.SEEK_DATA:
		if off < 0 || off >= size {
			return 0, syscall.ENXIO
		}
		return off, nil
	case unix.SEEK_HOLE:
		if off < 0 || off >= size {
			return 0, syscall.ENXIO
		}
		return size, nil
	case unix.SEEK_SET:
		return off, nil
	case unix.SEEK_END:
		return size + off, nil
	}
	return 0, syscall.EINVAL
}

// Sync is fsync(2) of the upper file; the lower never changes.
func (f *File) Sync(dataOnly bool) error {
	f.mu.Lock()
	uf := f.uf
	f.mu.Unlock()
	if uf != nil {
		return uf.Sync(dataOnly)
	}
	return nil
}

// Stat returns the attributes of the open file.
func (f *File) Stat() (unix.Stat_t, error) {
	fs := f.fs
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	var st unix.Stat_t
	var err error
	f.mu.Lock()
	lf := f.lf
	f.mu.Unlock()
	switch {
	case f.n.upper != 0:
		f.n.mu.Lock()
		uf, err1 := f.upperFile()
		f.n.mu.Unlock()
		if err1 != nil {
			return st, err1
		}
		st, err = uf.Stat()
	case lf != nil && lf.Fd() >= 0:
		err = errnoOf(unix.Fstat(lf.Fd(), &st))
	default:
		st, err = fs.lower.Lstat(f.n.lowerPath)
	}
	if err != nil {
		return st, err
	}
	return st, fs.fixStatLocked(f.n, &st)
}

// Release closes the File and drops its reference.
func (f *File) Release() {
	f.mu.Lock()
	if f.uf != nil {
		f.uf.Release()
		f.uf = nil
	}
	if f.lf != nil {
		f.lf.Close()
		f.lf = nil
	}
	f.mu.Unlock()
	if f.onLower {
		f.n.mu.Lock()
		f.n.lowerDirect--
		f.n.mu.Unlock()
	}
	f.fs.unref(f.n, 1)
}
