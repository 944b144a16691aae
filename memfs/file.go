package memfs

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// openFlags are the open(2) flags memfs passes on; the rest are either
// handled by the layer above (O_DIRECT: the kernel computes caching for
// the file it hands out) or meaningless here. O_APPEND is passed on
// because tmpfs opens an append-only file for writing only with it (the
// kernel computes the offsets of appending writes all the same).
const openFlags = unix.O_ACCMODE | unix.O_TRUNC | unix.O_APPEND

// File is an open regular file of a Layer. It holds a reference to its
// inode until Release.
type File struct {
	l *Layer
	i *inode
	// fd is the open descriptor. Immutable until Release.
	fd int
	// writable says fd is open for writing. Immutable.
	writable bool
	// direct says the caller may move bytes on fd itself. Immutable.
	direct bool
}

// Fd returns the File's descriptor of the inode in the tmpfs instance.
func (f *File) Fd() int { return f.fd }

// Ino returns the File's inode number.
func (f *File) Ino() uint64 { return f.i.ino }

// FileID returns the device and inode numbers of the file Fd is open on,
// as fstat(2) would.
func (f *File) FileID() (dev, ino uint64) { return f.l.dev, f.i.ino }

// Handle returns the File's inode number and generation, which name it to
// LookupHandle even once it has no name; ok is always true.
func (f *File) Handle() (ino uint64, gen uint32, ok bool) { return f.i.ino, f.i.gen, true }

// Direct says whether the caller may read and write on Fd directly.
func (f *File) Direct() bool { return f.direct }

// Open opens the regular file ino with the access mode and O_TRUNC of flags.
//
// Errors: EISDIR, EINVAL (not a regular file), EPERM (write access to a
// write-sealed file; O_TRUNC of a shrink-sealed one), ENOENT.
func (l *Layer) Open(ino uint64, flags int, o vfs.OpenOptions) (vfs.File, error) {
	i, err := l.get(ino)
	if err != nil {
		return nil, err
	}
	switch i.fileType {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		return nil, syscall.EISDIR
	default:
		return nil, syscall.EINVAL
	}
	flags &= openFlags
	writable := flags&unix.O_ACCMODE != unix.O_RDONLY
	trunc := flags&unix.O_TRUNC != 0

	i.mu.Lock()
	defer i.mu.Unlock()
	seals, err := l.sealsLocked(i)
	if err != nil {
		return nil, err
	}
	if (writable || trunc) && seals&SealWrite != 0 {
		return nil, l.sealDenied()
	}
	if trunc && seals&SealShrink != 0 {
		var st unix.Stat_t
		if err := l.withFdLockless(i, &st); err != nil {
			return nil, err
		}
		if st.Size > 0 {
			return nil, l.sealDenied()
		}
	}
	fd, err := l.openInode(i, flags&^unix.O_TRUNC)
	if err != nil {
		return nil, err
	}
	f, err := l.newFileLocked(i, fd, writable, seals, 0, o)
	if err != nil {
		unix.Close(fd)
		return nil, err
	}
	if trunc {
		var st unix.Stat_t
		err := unix.Fstat(fd, &st)
		if err == nil && o.KillSuidGid {
			err = killSuidGid(fd, st.Mode)
		}
		if err == nil && st.Size != 0 {
			err = unix.Ftruncate(fd, 0)
		}
		if err != nil {
			f.releaseLocked()
			return nil, Errno(err)
		}
	}
	return f, nil
}

// withFdLockless stats i through a transient or cached descriptor.
func (l *Layer) withFdLockless(i *inode, st *unix.Stat_t) error {
	fd, transient, err := l.pathFd(i)
	if err != nil {
		return err
	}
	err = unix.Fstatat(fd, "", st, unix.AT_EMPTY_PATH)
	if transient {
		unix.Close(fd)
	}
	return Errno(err)
}

// newFileLocked wraps fd, an open descriptor of i, in a File holding a
// reference to i. mode is i's mode if the caller knows it, else 0.
//
// Preconditions:
//   - i.mu is locked.
func (l *Layer) newFileLocked(i *inode, fd int, writable bool, seals Seals, mode uint32, o vfs.OpenOptions) (*File, error) {
	direct := o.Direct
	if writable && (direct || o.KillSuidGid) {
		if mode == 0 {
			var st unix.Stat_t
			if err := unix.Fstat(fd, &st); err != nil {
				return nil, Errno(err)
			}
			mode = st.Mode
		}
		if o.KillSuidGid && hasSetID(mode) {
			if err := killSuidGid(fd, mode); err != nil {
				return nil, err
			}
			mode &^= unix.S_ISUID | unix.S_ISGID
		}
		direct = direct && seals&SealGrow == 0 && !hasSetID(mode)
	}
	l.mu.Lock()
	i.refs++
	l.mu.Unlock()
	if writable {
		i.writers++
		if direct {
			i.directWriters++
		}
	}
	return &File{l: l, i: i, fd: fd, writable: writable, direct: direct}, nil
}

// hasSetID says whether a write by an unprivileged process would have to
// clear set-ID bits of a file with mode.
func hasSetID(mode uint32) bool {
	return mode&unix.S_ISUID != 0 || mode&(unix.S_ISGID|unix.S_IXGRP) == unix.S_ISGID|unix.S_IXGRP
}

// Create creates the regular file name in parent for c with mode's
// permission bits and opens it with flags. With O_EXCL an existing name is
// EEXIST; without, an existing regular file is opened instead. The Entry
// and the File each hold a reference.
//
// Errors: as Mkdir and Open.
func (l *Layer) Create(parent uint64, name string, flags int, mode uint32, c vfs.Caller, o vfs.OpenOptions) (vfs.Entry, vfs.File, error) {
	if err := CheckName(name); err != nil {
		return vfs.Entry{}, nil, err
	}
	var (
		e       vfs.Entry
		f       vfs.File
		existed bool
	)
	noRoom := l.reserveMeta(bogoInode)
	err := l.withFd(parent, func(p *inode, pfd int) error {
		acc := flags & unix.O_ACCMODE
		if noRoom != nil {
			// Opening an existing file takes no room.
			if err := existsOr(pfd, name, noRoom); err != syscall.EEXIST || flags&unix.O_EXCL != 0 {
				return err
			}
			existed = true
			var err error
			e, err = l.entryAt(pfd, name)
			return err
		}
		p.mu.Lock()
		fd, err := unix.Openat(pfd, name, acc|unix.O_CREAT|unix.O_EXCL|unix.O_NOFOLLOW|unix.O_CLOEXEC, createModeLocked(p, pfd, mode&07777, c))
		p.mu.Unlock()
		if err == unix.EEXIST && flags&unix.O_EXCL == 0 {
			existed = true
			e, err = l.entryAt(pfd, name)
			return err
		}
		if err != nil {
			return Errno(err)
		}
		e, f, err = l.newFile(fd, pfd, c, acc != unix.O_RDONLY, o)
		if err != nil {
			unix.Unlinkat(pfd, name, 0)
		}
		return err
	})
	if err != nil {
		if e.Ino() != 0 {
			l.Forget(e.Ino(), 1)
		}
		return vfs.Entry{}, nil, err
	}
	if existed {
		if e.Stat.Mode&unix.S_IFMT != unix.S_IFREG {
			l.Forget(e.Ino(), 1)
			return vfs.Entry{}, nil, syscall.EEXIST
		}
		if f, err = l.Open(e.Ino(), flags, o); err != nil {
			l.Forget(e.Ino(), 1)
			return vfs.Entry{}, nil, err
		}
	}
	return e, f, nil
}

// Tmpfile creates an unnamed regular file in the directory parent for c,
// open with flags (O_TMPFILE(2)); Link can give it a name later. The Entry
// and the File each hold a reference.
//
// Errors: ENOTDIR, ENOSPC, EINVAL (read-only flags).
func (l *Layer) Tmpfile(parent uint64, flags int, mode uint32, c vfs.Caller, o vfs.OpenOptions) (vfs.Entry, vfs.File, error) {
	acc := flags & unix.O_ACCMODE
	if acc == unix.O_RDONLY {
		return vfs.Entry{}, nil, syscall.EINVAL
	}
	if err := l.reserveMeta(bogoInode); err != nil {
		return vfs.Entry{}, nil, err
	}
	var (
		e vfs.Entry
		f *File
	)
	err := l.withFd(parent, func(p *inode, pfd int) error {
		p.mu.Lock()
		fd, err := unix.Openat(pfd, ".", acc|unix.O_TMPFILE|unix.O_CLOEXEC|flags&unix.O_EXCL, createModeLocked(p, pfd, mode&07777, c))
		p.mu.Unlock()
		if err != nil {
			return Errno(err)
		}
		e, f, err = l.newFile(fd, pfd, c, true, o)
		return err
	})
	if err != nil {
		return vfs.Entry{}, nil, err
	}
	return e, f, nil
}

// newFile gives the file just created as fd (in the directory pfd) to c,
// registers it and wraps fd in a File. The Entry and the File each hold a
// reference. On error fd is closed and no reference is held.
func (l *Layer) newFile(fd, pfd int, c vfs.Caller, writable bool, o vfs.OpenOptions) (vfs.Entry, *File, error) {
	var st unix.Stat_t
	if err := giveTo(fd, pfd, &st, c); err != nil {
		unix.Close(fd)
		return vfs.Entry{}, nil, err
	}
	// A new file has no capabilities.
	e, _, err := l.registerFd(fd, &st, false, knownXattrs{caps: xattrAbsent})
	if err != nil {
		unix.Close(fd)
		return vfs.Entry{}, nil, err
	}
	i, err := l.get(e.Ino())
	if err == nil {
		i.mu.Lock()
		if !i.sealsLoaded {
			// Nor seals: its first open reads no marker.
			i.seals, i.sealsLoaded = 0, true
		}
		var f *File
		f, err = l.newFileLocked(i, fd, writable, 0, st.Mode, o)
		i.mu.Unlock()
		if err == nil {
			return e, f, nil
		}
	}
	unix.Close(fd)
	l.Forget(e.Ino(), 1)
	return vfs.Entry{}, nil, err
}

// ReadAt reads from the file at off; a short count means end of file.
func (f *File) ReadAt(p []byte, off int64) (int, error) {
	n, err := unix.Pread(f.fd, p, off)
	if err != nil {
		return 0, Errno(err)
	}
	return n, nil
}

// WriteAt writes p at off, obeying the seals: EPERM on a write-sealed file;
// on a grow-sealed file a write past the end of file is cut back to the
// start of the page holding the end of file (EPERM if nothing is left).
// An empty write succeeds whatever the seals. With kill, set-ID bits are
// cleared first, as for a writer without CAP_FSETID. When the instance is
// full the write is short, then ENOSPC, and nothing written is lost.
func (f *File) WriteAt(p []byte, off int64, kill bool) (int, error) {
	if len(p) == 0 {
		return 0, nil
	}
	if !f.writable {
		return 0, syscall.EBADF
	}
	i := f.i
	i.mu.Lock()
	defer i.mu.Unlock()
	seals, err := f.l.sealsLocked(i)
	if err != nil {
		return 0, err
	}
	if seals&SealWrite != 0 {
		return 0, f.l.sealDenied()
	}
	if seals&SealGrow != 0 || kill {
		var st unix.Stat_t
		if err := unix.Fstat(f.fd, &st); err != nil {
			return 0, Errno(err)
		}
		if end := off + int64(len(p)); seals&SealGrow != 0 && end > st.Size {
			pgstart := st.Size &^ (pageSize - 1)
			if end > pgstart {
				end = pgstart
			}
			if end <= off {
				return 0, f.l.sealDenied()
			}
			p = p[:end-off]
		}
		if kill {
			if err := killSuidGid(f.fd, st.Mode); err != nil {
				return 0, err
			}
		}
	}
	n, err := unix.Pwrite(f.fd, p, off)
	if err != nil {
		return 0, Errno(err)
	}
	return n, nil
}

const pageSize = 4096

// Allocate is fallocate(2) on the file. Seals apply: punching a hole in a
// write-sealed file, or growing a grow-sealed one, is EPERM.
func (f *File) Allocate(mode uint32, off, length int64) error {
	i := f.i
	i.mu.Lock()
	defer i.mu.Unlock()
	seals, err := f.l.sealsLocked(i)
	if err != nil {
		return err
	}
	if mode&unix.FALLOC_FL_PUNCH_HOLE != 0 && seals&SealWrite != 0 {
		return f.l.sealDenied()
	}
	if mode&unix.FALLOC_FL_KEEP_SIZE == 0 && seals&SealGrow != 0 {
		var st unix.Stat_t
		if err := unix.Fstat(f.fd, &st); err != nil {
			return Errno(err)
		}
		if off+length > st.Size {
			return f.l.sealDenied()
		}
	}
	return Errno(unix.Fallocate(f.fd, mode, off, length))
}

// Seek is lseek(2) for SEEK_DATA and SEEK_HOLE (and the plain whences): it
// returns the resulting offset and does not move a position memfs uses.
func (f *File) Seek(off int64, whence int) (int64, error) {
	n, err := unix.Seek(f.fd, off, whence)
	return n, Errno(err)
}

// Sync is fsync(2), or fdatasync(2) with dataOnly.
func (f *File) Sync(dataOnly bool) error {
	if dataOnly {
		return Errno(unix.Fdatasync(f.fd))
	}
	return Errno(unix.Fsync(f.fd))
}

// Stat returns the attributes of the open file, even once unlinked.
func (f *File) Stat() (unix.Stat_t, error) {
	var st unix.Stat_t
	err := unix.Fstat(f.fd, &st)
	return st, Errno(err)
}

// Release closes the File and drops its reference.
func (f *File) Release() {
	f.i.mu.Lock()
	f.releaseLocked()
	f.i.mu.Unlock()
}

// releaseLocked is Release.
//
// Preconditions:
//   - f.i.mu is locked.
func (f *File) releaseLocked() {
	unix.Close(f.fd)
	if f.writable {
		f.i.writers--
		if f.direct {
			f.i.directWriters--
		}
	}
	f.l.Forget(f.i.ino, 1)
}
