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
// instance stores and applies itself (see createModeLocked).
const aclDefaultXattr = "system.posix_acl_default"

// capXattr names a file's capabilities, which the kernel asks a FUSE
// server for before every write and chown of a file, to clear them.
const capXattr = "security.capability"

// xattrState is what an inode knows of one of its extended attributes.
type xattrState uint8

const (
	// xattrUnknown: ask the instance.
	xattrUnknown xattrState = iota
	// xattrAbsent: the inode has no such attribute.
	xattrAbsent
	// xattrPresent: it has one (its value is not kept: ask the instance).
	xattrPresent
)

// knownXattrs is what an inode just made is known to have (see
// inode.defaultACL).
type knownXattrs struct{ defaultACL, caps xattrState }

// knownXattr returns the field of i that remembers the attribute name, or
// nil if i remembers nothing of it. The field is protected by i.mu, which
// is held across the instance's call that reads, sets or removes the
// attribute, so that what the field says is never older than the call.
func (i *inode) knownXattr(name string) *xattrState {
	switch name {
	case aclDefaultXattr:
		return &i.defaultACL
	case capXattr:
		return &i.caps
	}
	return nil
}

// learnt returns what a getxattr that returned err says of the attribute,
// or was if it says nothing.
func learnt(was xattrState, err error) xattrState {
	switch err {
	case nil, unix.ERANGE:
		return xattrPresent
	case unix.ENODATA:
		return xattrAbsent
	}
	return was
}

// createModeLocked returns the mode to create an inode for c with in the
// directory p, open as pfd: mode less c's umask, unless p has a default
// ACL. Then the instance, whose process umask is 0, masks mode with the
// ACL it gives the new inode, as posix_acl_create does on Linux. p's
// default ACL is read from the instance once, and only if the umask
// matters.
//
// Preconditions:
//   - p.mu is locked, and stays locked until the inode is made, so that
//     the default ACL the instance applies is the one p.defaultACL says.
func createModeLocked(p *inode, pfd int, mode uint32, c vfs.Caller) uint32 {
	if mode&c.Umask&0777 == 0 {
		return mode
	}
	if defaultACLLocked(p, pfd) == xattrPresent {
		return mode
	}
	return mode &^ (c.Umask & 0777)
}

// defaultACLLocked returns whether the directory p, open as pfd, has a
// default ACL, reading it from the instance if p does not know.
//
// Preconditions:
//   - p.mu is locked.
func defaultACLLocked(p *inode, pfd int) xattrState {
	if p.defaultACL == xattrUnknown {
		n, err := unix.Getxattr(procPath(pfd), aclDefaultXattr, nil)
		if err == nil && n == 0 {
			err = unix.ENODATA // an empty one is none
		}
		p.defaultACL = learnt(xattrUnknown, err)
	}
	return p.defaultACL
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
	err := l.withFd(ino, func(i *inode, fd int) error {
		known := i.knownXattr(name)
		if known == nil {
			var err error
			n, err = unix.Getxattr(procPath(fd), name, dest)
			return Errno(err)
		}
		i.mu.Lock()
		defer i.mu.Unlock()
		if *known == xattrAbsent {
			return syscall.ENODATA
		}
		var err error
		n, err = unix.Getxattr(procPath(fd), name, dest)
		*known = learnt(*known, err)
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
	return l.withFd(ino, func(i *inode, fd int) error {
		if known := i.knownXattr(name); known != nil {
			// What the instance keeps of the value is its business (an
			// empty ACL removes one): the next reader asks.
			i.mu.Lock()
			defer i.mu.Unlock()
			*known = xattrUnknown
		}
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
	return l.withFd(ino, func(i *inode, fd int) error {
		known := i.knownXattr(name)
		if known == nil {
			return Errno(unix.Removexattr(procPath(fd), name))
		}
		i.mu.Lock()
		defer i.mu.Unlock()
		err := unix.Removexattr(procPath(fd), name)
		if err == nil || err == unix.ENODATA {
			*known = xattrAbsent
		} else {
			*known = xattrUnknown
		}
		return Errno(err)
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
	l.chargeMeta(int64(xattrSpace + len(markerPrefix) + len(key) + len(value)))
	err = unix.Setxattr(procPath(fd), markerPrefix+key, value, flags)
	if transient {
		unix.Close(fd)
	}
	return Errno(err)
}
