package memfs

import (
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// maxNameLen is the longest name tmpfs accepts.
const maxNameLen = 255

// CheckName accepts exactly one path component that names an entry of a
// directory: no slash, no NUL, not "." or "..", not empty. It returns
// ENOENT, EINVAL or ENAMETOOLONG otherwise.
func CheckName(name string) error {
	switch {
	case name == "":
		return syscall.ENOENT
	case name == "." || name == "..":
		return syscall.EINVAL
	case len(name) > maxNameLen:
		return syscall.ENAMETOOLONG
	case strings.ContainsAny(name, "/\x00"):
		return syscall.EINVAL
	}
	return nil
}

// Lookup finds name in the directory parent and adds a reference to it.
// It never follows a symlink: a symlink is returned as itself.
//
// Errors: ENOENT, ENOTDIR (parent is not a directory), EINVAL (name is not
// one component), ENAMETOOLONG.
func (l *Layer) Lookup(parent uint64, name string) (vfs.Entry, error) {
	if err := CheckName(name); err != nil {
		return vfs.Entry{}, err
	}
	var e vfs.Entry
	err := l.withFd(parent, func(_ *inode, pfd int) error {
		var err error
		e, err = l.entryAt(pfd, name)
		return err
	})
	return e, err
}

// entryAt registers the entry name of the directory open as dirfd, without
// following a symlink, and returns it with one reference added.
func (l *Layer) entryAt(dirfd int, name string) (vfs.Entry, error) {
	var st unix.Stat_t
	if err := unix.Fstatat(dirfd, name, &st, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return vfs.Entry{}, Errno(err)
	}
	l.mu.Lock()
	if i := l.inodes[st.Ino]; i != nil {
		i.refs++
		l.mu.Unlock()
		return vfs.Entry{Stat: st, Gen: i.gen}, nil
	}
	l.mu.Unlock()

	// A new inode: pin the very inode now at name (it may have changed
	// since the stat) and register that one.
	st = unix.Stat_t{}
	fd, err := unix.Openat(dirfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return vfs.Entry{}, Errno(err)
	}
	return l.registerPath(fd, &st, knownXattrs{})
}

// registerPath registers the inode open as the O_PATH descriptor fd, which
// it consumes: fd becomes the inode's cached descriptor or is closed.
// st is filled in from fd unless st.Ino is already set. A new inode
// starts knowing known (see registerFd).
func (l *Layer) registerPath(fd int, st *unix.Stat_t, known knownXattrs) (vfs.Entry, error) {
	if st.Ino == 0 {
		if err := unix.Fstat(fd, st); err != nil {
			unix.Close(fd)
			return vfs.Entry{}, Errno(err)
		}
	}
	e, adopted, err := l.registerFd(fd, st, true, known)
	if !adopted {
		unix.Close(fd)
	}
	return e, err
}
