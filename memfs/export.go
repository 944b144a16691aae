package memfs

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

var _ vfs.Exporter = (*Layer)(nil)

// LookupInode adds one reference to the inode ino and returns its Entry; it
// implements vfs.Exporter. The caller may hold no reference to ino, but
// somebody must: only a registered inode is found.
//
// Errors: ESTALE (ino is not registered, or its inode is gone).
func (l *Layer) LookupInode(ino uint64) (vfs.Entry, error) {
	l.mu.Lock()
	i := l.inodes[ino]
	if i != nil {
		i.refs++
	}
	l.mu.Unlock()
	if i == nil {
		return vfs.Entry{}, syscall.ESTALE
	}
	st, err := l.GetAttr(ino)
	if err != nil {
		l.Forget(ino, 1)
		if err == syscall.ENOENT {
			err = syscall.ESTALE
		}
		return vfs.Entry{}, err
	}
	return vfs.Entry{Stat: st, Gen: i.gen}, nil
}

// LookupParent returns the directory holding the directory ino, with one
// reference added; the root's parent is the root. It implements
// vfs.Exporter.
//
// Errors: ENOTDIR, ESTALE (ino is not registered).
func (l *Layer) LookupParent(ino uint64) (vfs.Entry, error) {
	if ino == vfs.RootIno {
		// ".." of the instance's root leaves the instance.
		return l.LookupInode(vfs.RootIno)
	}
	var e vfs.Entry
	err := l.withFd(ino, func(i *inode, fd int) error {
		if i.fileType != unix.S_IFDIR {
			return syscall.ENOTDIR
		}
		pfd, err := unix.Openat(fd, "..", unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
		if err != nil {
			return Errno(err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(pfd, &st); err != nil {
			unix.Close(pfd)
			return Errno(err)
		}
		var adopted bool
		e, adopted, err = l.registerFd(pfd, &st, true, knownXattrs{})
		if !adopted {
			unix.Close(pfd)
		}
		return err
	})
	return e, err
}
