package memfs

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// GetFlags returns ino's inode flags, which tmpfs keeps (Linux >= 6.0:
// immutable, append-only, nodump, noatime).
//
// Errors: ENOTTY (neither a regular file nor a directory).
func (l *Layer) GetFlags(ino uint64) (uint32, error) {
	var flags uint32
	err := l.withFlagsFd(ino, func(fd int) error {
		v, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
		flags = v
		return Errno(err)
	})
	return flags, err
}

// SetFlags sets ino's inode flags in tmpfs, which then enforces them on
// every operation memfs makes: an immutable file cannot be opened for
// writing, changed, linked, renamed or removed (EPERM); an append-only
// one only opened for appending, and not truncated, renamed or removed.
//
// Errors: EOPNOTSUPP (a flag tmpfs does not keep), ENOTTY.
func (l *Layer) SetFlags(ino uint64, flags uint32) error {
	return l.withFlagsFd(ino, func(fd int) error {
		return Errno(unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, int(flags)))
	})
}

// withFlagsFd runs fn with a read-only descriptor of the regular file or
// directory ino: the flags ioctls need an open file.
func (l *Layer) withFlagsFd(ino uint64, fn func(fd int) error) error {
	i, err := l.get(ino)
	if err != nil {
		return err
	}
	flags := unix.O_RDONLY | unix.O_NONBLOCK | unix.O_NOFOLLOW
	switch i.fileType {
	case unix.S_IFREG:
	case unix.S_IFDIR:
		flags |= unix.O_DIRECTORY
	default:
		return syscall.ENOTTY
	}
	fd, err := l.openInode(i, flags)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return fn(fd)
}
