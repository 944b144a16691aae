package fusefs

import (
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
)

// FileSystem is the tree fusefs serves: a memfs Layer (through FromLayer) or
// an overlay of one. Inode numbers are the file system's own and become
// FUSE node ids unchanged, so a restarted server can re-derive them; the
// root is memfs.RootIno. Every method returns nil or a syscall.Errno, and
// follows memfs's reference rules: each returned Entry, File and Dir holds a
// reference, dropped by Forget, Release and Close.
type FileSystem interface {
	Lookup(parent uint64, name string) (memfs.Entry, error)
	Forget(ino, n uint64)
	GetAttr(ino uint64) (unix.Stat_t, error)
	// SetAttr changes attributes; f is an open File of ino or nil.
	SetAttr(ino uint64, f File, a memfs.SetAttr) (unix.Stat_t, error)

	Mkdir(parent uint64, name string, mode uint32, c memfs.Caller) (memfs.Entry, error)
	// Mknod makes a regular file, FIFO, socket or device node; rdev is the
	// device number (unix.Mkdev's encoding).
	Mknod(parent uint64, name string, mode uint32, rdev uint64, c memfs.Caller) (memfs.Entry, error)
	Symlink(parent uint64, name, target string, c memfs.Caller) (memfs.Entry, error)
	Link(ino, newParent uint64, name string) (memfs.Entry, error)
	Unlink(parent uint64, name string) error
	Rmdir(parent uint64, name string) error
	Rename(parent uint64, name string, newParent uint64, newName string, flags uint32) error
	Readlink(ino uint64) (string, error)

	Create(parent uint64, name string, flags int, mode uint32, c memfs.Caller, o memfs.OpenOptions) (memfs.Entry, File, error)
	Open(ino uint64, flags int, o memfs.OpenOptions) (File, error)
	// Tmpfile creates an unnamed file in parent (O_TMPFILE).
	Tmpfile(parent uint64, flags int, mode uint32, c memfs.Caller, o memfs.OpenOptions) (memfs.Entry, File, error)
	OpenDir(ino uint64) (Dir, error)

	GetXattr(ino uint64, name string, dest []byte) (int, error)
	ListXattr(ino uint64, dest []byte) (int, error)
	SetXattr(ino uint64, name string, value []byte, flags int) error
	RemoveXattr(ino uint64, name string) error

	StatFS() (unix.Statfs_t, error)
}

// File is an open regular file (see memfs.File).
type File interface {
	// Fd is a descriptor of the backing file; when Direct is true the
	// kernel may read and write it itself (FUSE passthrough).
	Fd() int
	Direct() bool
	ReadAt(p []byte, off int64) (int, error)
	WriteAt(p []byte, off int64, kill bool) (int, error)
	Allocate(mode uint32, off, length int64) error
	Seek(off int64, whence int) (int64, error)
	Sync(dataOnly bool) error
	Stat() (unix.Stat_t, error)
	Release()
}

// Dir is an open directory (see memfs.Dir).
type Dir interface {
	ReadDir(off int64, fn func(*memfs.DirEntry) bool) error
	Sync() error
	Close() error
}

// orphanFinder is implemented by FileSystems that can find a node with no
// name (a file removed while open, or an O_TMPFILE) by the tmpfs inode
// holding its data: a successor server reopens such files from their
// handle records (adopt.go). FindOrphan adds one reference to node ino,
// whose data is tmpfs inode dataIno of generation gen; ESTALE when that
// inode is gone or is not ino's.
type orphanFinder interface {
	FindOrphan(ino, dataIno uint64, gen uint32) error
}

// handleFile is implemented by Files that can name the tmpfs inode holding
// their data (memfs.File.Handle); ok is false when there is none yet.
type handleFile interface {
	Handle() (ino uint64, gen uint32, ok bool)
}

// FromLayer serves a memfs Layer on its own, with no lower layer.
func FromLayer(l *memfs.Layer) FileSystem { return layerFS{l} }

// layerFS adapts *memfs.Layer's concrete File and Dir types to the
// interfaces.
type layerFS struct{ *memfs.Layer }

// FindOrphan: a memfs node is its tmpfs inode.
func (l layerFS) FindOrphan(ino, dataIno uint64, gen uint32) error {
	if ino != dataIno {
		return unix.ESTALE
	}
	_, err := l.LookupHandle(ino, gen)
	return err
}

func (l layerFS) SetAttr(ino uint64, f File, a memfs.SetAttr) (unix.Stat_t, error) {
	mf, _ := f.(*memfs.File)
	return l.Layer.SetAttr(ino, mf, a)
}

func (l layerFS) Create(parent uint64, name string, flags int, mode uint32, c memfs.Caller, o memfs.OpenOptions) (memfs.Entry, File, error) {
	e, f, err := l.Layer.Create(parent, name, flags, mode, c, o)
	if err != nil {
		return e, nil, err
	}
	return e, f, nil
}

func (l layerFS) Tmpfile(parent uint64, flags int, mode uint32, c memfs.Caller, o memfs.OpenOptions) (memfs.Entry, File, error) {
	e, f, err := l.Layer.Tmpfile(parent, flags, mode, c, o)
	if err != nil {
		return e, nil, err
	}
	return e, f, nil
}

func (l layerFS) Open(ino uint64, flags int, o memfs.OpenOptions) (File, error) {
	f, err := l.Layer.Open(ino, flags, o)
	if err != nil {
		return nil, err
	}
	return f, nil
}

func (l layerFS) OpenDir(ino uint64) (Dir, error) {
	d, err := l.Layer.OpenDir(ino)
	if err != nil {
		return nil, err
	}
	return d, nil
}
