package overlay

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// FS_IMMUTABLE_FL and FS_APPEND_FL (linux/fs.h), which x/sys/unix does
// not name.
const (
	fsImmutableFl = 0x10
	fsAppendFl    = 0x20
)

// GetFlags returns ino's inode flags (see memfs.Layer.GetFlags): those of
// its upper inode, or none while it is wholly in the lower layer.
//
// Errors: ENOTTY (neither a regular file nor a directory).
func (fs *FS) GetFlags(ino uint64) (uint32, error) {
	n, err := fs.get(ino)
	if err != nil {
		return 0, err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	if n.upper != 0 {
		return fs.upper.GetFlags(n.upper)
	}
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR {
		return 0, syscall.ENOTTY
	}
	return 0, nil
}

// SetFlags sets ino's inode flags in its upper inode, copying its
// metadata up first. An append-only regular file is copied up whole: its
// writes must append, and a partial file's writes copy lower ranges in at
// their own offsets.
//
// Errors: as memfs.Layer.SetFlags.
func (fs *FS) SetFlags(ino uint64, flags uint32) error {
	n, err := fs.get(ino)
	if err != nil {
		return err
	}
	if n.typ != unix.S_IFREG && n.typ != unix.S_IFDIR {
		return syscall.ENOTTY
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if err := fs.copyUpLocked(n); err != nil {
		return err
	}
	if flags&fsAppendFl != 0 && n.typ == unix.S_IFREG {
		if err := fs.copyWholeLocked(n); err != nil {
			return err
		}
	}
	return fs.upper.SetFlags(n.upper, flags)
}

// copyWholeLocked copies the bytes of the copied-up regular file n that
// are still only in the lower into the upper.
//
// Preconditions:
//   - fs.treeMu is locked for writing; n.upper != 0.
func (fs *FS) copyWholeLocked(n *node) error {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.partial {
		return nil
	}
	uf, err := fs.upper.Open(n.upper, unix.O_RDWR, vfs.OpenOptions{})
	if err != nil {
		return err
	}
	defer uf.Release()
	lf, err := fs.lower.Open(n.lowerPath)
	if err != nil {
		return err
	}
	defer lf.Close()
	// Copying is not a change: the file keeps its times.
	return fs.keepTimes(n.upper, func() error {
		return fs.copyInLocked(n, uf.Fd(), lf, 0, n.limit)
	})
}
