package memfs

import (
	"math"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Mkdir creates the directory name in parent, owned by c, with mode's
// permission bits (the set-group-ID bit is inherited from parent as on
// Linux), and returns it with one reference.
//
// Errors: EEXIST, ENOENT (parent was removed), ENOSPC, EINVAL, ENAMETOOLONG.
func (l *Layer) Mkdir(parent uint64, name string, mode uint32, c vfs.Caller) (vfs.Entry, error) {
	return l.create(parent, name, c, func(p *inode, pfd int) (knownXattrs, error) {
		// The new directory inherits p's default ACL, if any: learn
		// whether p has one (once per directory) to know the child's.
		acl := defaultACLLocked(p, pfd)
		err := unix.Mkdirat(pfd, name, createModeLocked(p, pfd, mode&07777, c))
		return knownXattrs{defaultACL: acl, caps: xattrAbsent}, err
	})
}

// Mknod creates a regular file, FIFO, socket, or block or character device
// with the device number rdev (as unix.Mkdev makes it; ignored for the
// other types). A device node is inert: the instance is mounted nodev, so
// nobody can open it through memfs's tree, and memfs never opens one.
//
// Errors: as Mkdir, EPERM for a directory, and EINVAL for other types and
// for an rdev beyond the kernel's 32-bit device numbers.
func (l *Layer) Mknod(parent uint64, name string, mode uint32, rdev uint64, c vfs.Caller) (vfs.Entry, error) {
	switch mode & unix.S_IFMT {
	case 0:
		mode |= unix.S_IFREG
		rdev = 0
	case unix.S_IFREG, unix.S_IFIFO, unix.S_IFSOCK:
		rdev = 0
	case unix.S_IFCHR, unix.S_IFBLK:
		if rdev > math.MaxUint32 {
			return vfs.Entry{}, syscall.EINVAL
		}
	case unix.S_IFDIR:
		return vfs.Entry{}, syscall.EPERM
	default:
		return vfs.Entry{}, syscall.EINVAL
	}
	return l.create(parent, name, c, func(p *inode, pfd int) (knownXattrs, error) {
		err := unix.Mknodat(pfd, name, createModeLocked(p, pfd, mode, c), int(rdev))
		return knownXattrs{caps: xattrAbsent}, err
	})
}

// Symlink creates the symlink name in parent pointing at target. The target
// is stored as given and never followed by memfs.
//
// Errors: as Mkdir, and ENOENT for an empty target.
func (l *Layer) Symlink(parent uint64, name, target string, c vfs.Caller) (vfs.Entry, error) {
	if target == "" {
		return vfs.Entry{}, syscall.ENOENT
	}
	return l.create(parent, name, c, func(_ *inode, pfd int) (knownXattrs, error) {
		return knownXattrs{caps: xattrAbsent}, unix.Symlinkat(target, pfd, name)
	})
}

// create checks name, runs mk to create it in parent, gives the new inode
// to c and returns it with one reference. mk runs with the lock of
// parent's inode p held (see createModeLocked) and returns what the new
// inode is known to have.
func (l *Layer) create(parent uint64, name string, c vfs.Caller, mk func(p *inode, pfd int) (knownXattrs, error)) (vfs.Entry, error) {
	if err := CheckName(name); err != nil {
		return vfs.Entry{}, err
	}
	noRoom := l.reserveMeta(bogoInode)
	var e vfs.Entry
	err := l.withFd(parent, func(p *inode, pfd int) error {
		if noRoom != nil {
			return existsOr(pfd, name, noRoom)
		}
		p.mu.Lock()
		known, err := mk(p, pfd)
		p.mu.Unlock()
		if err != nil {
			return Errno(err)
		}
		fd, err := unix.Openat(pfd, name, unix.O_PATH|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
		if err != nil {
			return Errno(err)
		}
		var st unix.Stat_t
		if err := giveTo(fd, pfd, &st, c); err != nil {
			unix.Close(fd)
			return err
		}
		e, err = l.registerPath(fd, &st, known)
		return err
	})
	return e, err
}

// existsOr returns EEXIST if name exists in the directory pfd, else err:
// the error of a create that found no room, as Linux orders them.
func existsOr(pfd int, name string, err error) error {
	var st unix.Stat_t
	if unix.Fstatat(pfd, name, &st, unix.AT_SYMLINK_NOFOLLOW) == nil {
		return syscall.EEXIST
	}
	return err
}

// giveTo makes the new inode open as fd (in the directory pfd) belong to c,
// as if c had created it, and stores its final attributes in st. The group
// is c's unless the directory is set-group-ID, in which case the kernel has
// already given the inode the directory's group.
func giveTo(fd, pfd int, st *unix.Stat_t, c vfs.Caller) error {
	if err := unix.Fstat(fd, st); err != nil {
		return Errno(err)
	}
	if c == vfs.Root {
		return nil
	}
	uid, gid := c.Uid, c.Gid
	if st.Gid != 0 {
		// Only a set-group-ID directory gives a root-created inode a
		// group other than 0.
		gid = st.Gid
	} else if gid != 0 {
		var pst unix.Stat_t
		if err := unix.Fstat(pfd, &pst); err != nil {
			return Errno(err)
		}
		if pst.Mode&unix.S_ISGID != 0 {
			gid = pst.Gid
		}
	}
	if uid == st.Uid && gid == st.Gid {
		return nil
	}
	mode := st.Mode
	if err := unix.Fchownat(fd, "", int(uid), int(gid), unix.AT_EMPTY_PATH); err != nil {
		return Errno(err)
	}
	// chown drops set-ID bits of non-directories; a new file keeps the
	// mode it was created with.
	if mode&(unix.S_ISUID|unix.S_ISGID) != 0 && mode&unix.S_IFMT != unix.S_IFLNK {
		if err := fchmodEmpty(fd, mode&07777); err != nil {
			return err
		}
	}
	return Errno(unix.Fstat(fd, st))
}

// Link makes name in newParent a new link to ino and returns ino with one
// more reference.
//
// Errors: EPERM (ino is a directory), EEXIST, ENOENT (ino was removed),
// EMLINK, ENOSPC, EINVAL.
func (l *Layer) Link(ino, newParent uint64, name string) (vfs.Entry, error) {
	var e vfs.Entry
	err := l.link(ino, newParent, name, func(fd int) error {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return Errno(err)
		}
		var err error
		e, err = l.register(fd, &st)
		return err
	})
	return e, err
}

// AddLink is Link for a caller that holds a reference to ino and wants
// no other: it returns no Entry and costs no stat of ino.
//
// Errors: as Link.
func (l *Layer) AddLink(ino, newParent uint64, name string) error {
	return l.link(ino, newParent, name, func(int) error { return nil })
}

// link makes name in newParent a link to ino, then calls linked with a
// descriptor of ino.
func (l *Layer) link(ino, newParent uint64, name string, linked func(fd int) error) error {
	if err := CheckName(name); err != nil {
		return err
	}
	// tmpfs counts a link as an inode.
	noRoom := l.reserveMeta(bogoInode)
	return l.withFd(ino, func(i *inode, fd int) error {
		if i.fileType == unix.S_IFDIR {
			return syscall.EPERM
		}
		return l.withFd(newParent, func(_ *inode, pfd int) error {
			if noRoom != nil {
				return existsOr(pfd, name, noRoom)
			}
			if err := unix.Linkat(fd, "", pfd, name, unix.AT_EMPTY_PATH); err != nil {
				return Errno(err)
			}
			return linked(fd)
		})
	})
}

// Unlink removes the non-directory name from parent.
//
// Errors: ENOENT, EISDIR, EINVAL.
func (l *Layer) Unlink(parent uint64, name string) error {
	return l.remove(parent, name, 0)
}

// Rmdir removes the empty directory name from parent.
//
// Errors: ENOENT, ENOTDIR, ENOTEMPTY, EINVAL.
func (l *Layer) Rmdir(parent uint64, name string) error {
	return l.remove(parent, name, unix.AT_REMOVEDIR)
}

func (l *Layer) remove(parent uint64, name string, flags int) error {
	if err := CheckName(name); err != nil {
		return err
	}
	return l.withFd(parent, func(_ *inode, pfd int) error {
		return Errno(unix.Unlinkat(pfd, name, flags))
	})
}

// Rename moves name in parent to newName in newParent, as renameat2 with
// flags (0, vfs.RenameNoReplace or vfs.RenameExchange).
//
// Errors: as renameat2(2): ENOENT, EEXIST, ENOTEMPTY, EISDIR, ENOTDIR,
// EINVAL (moving a directory into itself, or other flags).
func (l *Layer) Rename(parent uint64, name string, newParent uint64, newName string, flags uint32) error {
	if flags&^(vfs.RenameNoReplace|vfs.RenameExchange) != 0 {
		return syscall.EINVAL
	}
	if err := CheckName(name); err != nil {
		return err
	}
	if err := CheckName(newName); err != nil {
		return err
	}
	return l.withFd(parent, func(_ *inode, pfd int) error {
		return l.withFd(newParent, func(_ *inode, npfd int) error {
			return Errno(unix.Renameat2(pfd, name, npfd, newName, uint(flags)))
		})
	})
}

// Readlink returns the target of the symlink ino.
//
// Errors: EINVAL (ino is not a symlink).
func (l *Layer) Readlink(ino uint64) (string, error) {
	var target string
	err := l.withFd(ino, func(i *inode, fd int) error {
		if i.fileType != unix.S_IFLNK {
			return syscall.EINVAL
		}
		buf := make([]byte, unix.PathMax)
		n, err := unix.Readlinkat(fd, "", buf)
		if err != nil {
			return Errno(err)
		}
		target = string(buf[:n])
		return nil
	})
	return target, err
}
