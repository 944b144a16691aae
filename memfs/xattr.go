package memfs

import (
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

const (
	// markerPrefix starts the names of memfs's internal attributes. trusted.*
	// needs CAP_SYS_ADMIN to read or write, and memfs refuses the prefix to
	// its own callers, so a pod can neither see nor forge a marker.
	markerPrefix = "trusted.memfs."
	// SealsXattr is the attribute through which applications read and add
	// seals (value: a seal list, as ParseSeals takes).
	SealsXattr = "user.memfs.seals"
)

// procPath names the inode open as fd through procfs. The xattr system
// calls refuse O_PATH descriptors, but resolving the magic link lands on
// exactly the inode fd names, even a symlink, without any path walk a pod
// could influence.
func procPath(fd int) string {
	return "/proc/self/fd/" + strconv.Itoa(fd)
}

func isMarker(name string) bool { return strings.HasPrefix(name, markerPrefix) }

// aclDefaultXattr names a directory's default POSIX ACL, which the
// instance stores and applies itself (see createMode).
const aclDefaultXattr = "system.posix_acl_default"

// createMode returns the mode to create an inode for c with in the
// directory pfd: mode less c's umask, unless the directory has a default
// ACL. Then the instance, whose process umask is 0, masks mode with the
// ACL it gives the new inode, as posix_acl_create does on Linux.
func createMode(pfd int, mode uint32, c vfs.Caller) uint32 {
	if mode&c.Umask&0777 == 0 {
		return mode
	}
	if n, err := unix.Getxattr(procPath(pfd), aclDefaultXattr, nil); err == nil && n > 0 {
		return mode
	}
	return mode &^ (c.Umask & 0777)
}

// GetXattr reads the attribute name of ino into dest and returns its size;
// with an empty dest it returns only the size. SealsXattr reads the seals.
//
// Errors: ENODATA (absent, or an internal name), ERANGE (dest too small).
func (l *Layer) GetXattr(ino uint64, name string, dest []byte) (int, error) {
	if isMarker(name) {
		return 0, syscall.ENODATA
	}
	if name == SealsXattr {
		s, err := l.Seals(ino)
		if err != nil || s == 0 {
			return 0, syscall.ENODATA
		}
		v := s.String()
		if len(dest) == 0 {
			return len(v), nil
		}
		if len(dest) < len(v) {
			return 0, syscall.ERANGE
		}
		return copy(dest, v), nil
	}
	var n int
	err := l.withFd(ino, func(_ *inode, fd int) error {
		var err error
		n, err = unix.Getxattr(procPath(fd), name, dest)
		return Errno(err)
	})
	return n, err
}

// ListXattr writes the NUL-terminated names of ino's attributes into dest
// and returns their size; with an empty dest it returns only the size.
// Internal names are left out; SealsXattr is listed on a sealed file.
//
// Errors: ERANGE (dest too small).
func (l *Layer) ListXattr(ino uint64, dest []byte) (int, error) {
	var names []byte
	err := l.withFd(ino, func(i *inode, fd int) error {
		p := procPath(fd)
		for {
			size, err := unix.Listxattr(p, nil)
			if err != nil {
				return Errno(err)
			}
			buf := make([]byte, size)
			n, err := unix.Listxattr(p, buf)
			if err == unix.ERANGE {
				continue // grew meanwhile
			}
			if err != nil {
				return Errno(err)
			}
			names = filterMarkers(buf[:n])
			return nil
		}
	})
	if err != nil {
		return 0, err
	}
	if s, err := l.Seals(ino); err == nil && s != 0 {
		names = append(append(names, SealsXattr...), 0)
	}
	if len(dest) == 0 {
		return len(names), nil
	}
	if len(dest) < len(names) {
		return 0, syscall.ERANGE
	}
	return copy(dest, names), nil
}

// filterMarkers removes internal names from a NUL-separated name list.
func filterMarkers(list []byte) []byte {
	out := list[:0]
	for len(list) > 0 {
		end := 0
		for end < len(list) && list[end] != 0 {
			end++
		}
		name := list[:end]
		if end < len(list) {
			end++
		}
		if !isMarker(string(name)) {
			out = append(append(out, name...), 0)
		}
		list = list[end:]
	}
	return out
}

// SetXattr sets the attribute name of ino, with setxattr(2) flags.
// Setting SealsXattr adds the seals its value lists (see AddSeals).
//
// POSIX ACLs are stored and enforced by the instance: setting
// system.posix_acl_access sets the mode's permission bits too, and a
// chmod (SetAttr) updates the ACL's mask.
//
// Errors: EPERM (an internal name), EEXIST or ENODATA (flags), ENOSPC
// (also when the volume's size has no room for the attribute: see
// StatFS), E2BIG, EINVAL (a malformed ACL), and AddSeals's errors for
// SealsXattr.
func (l *Layer) SetXattr(ino uint64, name string, value []byte, flags int) error {
	if isMarker(name) {
		return syscall.EPERM
	}
	if name == SealsXattr {
		s, err := ParseSeals(string(value))
		if err != nil {
			return err
		}
		return l.AddSeals(ino, s)
	}
	if err := l.reserveMeta(int64(xattrSpace + len(name) + len(value))); err != nil {
		return err
	}
	return l.withFd(ino, func(_ *inode, fd int) error {
		return Errno(unix.Setxattr(procPath(fd), name, value, flags))
	})
}

// RemoveXattr removes the attribute name of ino.
//
// Errors: ENODATA, EPERM (an internal name or SealsXattr: seals are never
// removed).
func (l *Layer) RemoveXattr(ino uint64, name string) error {
	if isMarker(name) || name == SealsXattr {
		return syscall.EPERM
	}
	return l.withFd(ino, func(_ *inode, fd int) error {
		return Errno(unix.Removexattr(procPath(fd), name))
	})
}

// GetMarker reads the internal marker key (stored as trusted.memfs.<key>)
// of ino into dest, like GetXattr. Markers are for layers built on memfs
// (the overlay's whiteouts and copy-up records); volume users never see
// them.
func (l *Layer) GetMarker(ino uint64, key string, dest []byte) (int, error) {
	i, err := l.get(ino)
	if err != nil {
		return 0, err
	}
	return l.getMarker(i, key, dest)
}

// SetMarker sets the internal marker key of ino, with setxattr(2) flags.
func (l *Layer) SetMarker(ino uint64, key string, value []byte, flags int) error {
	i, err := l.get(ino)
	if err != nil {
		return err
	}
	return l.setMarker(i, key, value, flags)
}

// RemoveMarker removes the internal marker key of ino.
func (l *Layer) RemoveMarker(ino uint64, key string) error {
	return l.withFd(ino, func(_ *inode, fd int) error {
		return Errno(unix.Removexattr(procPath(fd), markerPrefix+key))
	})
}

func (l *Layer) getMarker(i *inode, key string, dest []byte) (int, error) {
	fd, transient, err := l.pathFd(i)
	if err != nil {
		return 0, err
	}
	n, err := unix.Getxattr(procPath(fd), markerPrefix+key, dest)
	if transient {
		unix.Close(fd)
	}
	return n, Errno(err)
}

func (l *Layer) setMarker(i *inode, key string, value []byte, flags int) error {
	fd, transient, err := l.pathFd(i)
	if err != nil {
		return err
	}
	err = unix.Setxattr(procPath(fd), markerPrefix+key, value, flags)
	if transient {
		unix.Close(fd)
	}
	return Errno(err)
}
