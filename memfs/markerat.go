package memfs

import (
	"golang.org/x/sys/unix"
)

// GetMarkerAt reads the internal marker key of the entry name of the
// directory parent into dest, like GetMarker, without taking a reference on
// the entry. It lets a layer above read the markers of a whole directory's
// entries (the overlay's readdir) at one system call pair per entry. A
// symlink is read as itself.
//
// Errors: ENODATA (no such marker), ENOENT, ERANGE, EINVAL (name is not one
// component).
func (l *Layer) GetMarkerAt(parent uint64, name, key string, dest []byte) (int, error) {
	if err := CheckName(name); err != nil {
		return 0, err
	}
	var n int
	err := l.withFd(parent, func(_ *inode, pfd int) error {
		fd, err := unix.Openat(pfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return Errno(err)
		}
		defer unix.Close(fd)
		n, err = unix.Getxattr(procPath(fd), markerPrefix+key, dest)
		return Errno(err)
	})
	return n, err
}
