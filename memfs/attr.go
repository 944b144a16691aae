package memfs

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// GetAttr returns the attributes of ino.
func (l *Layer) GetAttr(ino uint64) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := l.withFd(ino, func(_ *inode, fd int) error {
		return Errno(unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH))
	})
	return st, err
}

// SetAttr changes the attributes of ino as a.Valid says, in the order size,
// owner, mode, times, and returns the attributes after the change. If f is
// an open writable File of ino, a size change uses it (a vfs.File of
// another file system is ignored).
//
// A size change obeys the seals: EPERM if it grows a grow-sealed or shrinks
// a shrink-sealed file. A change of owner clears set-ID bits as chown(2)
// does. A SetAttr that changes nothing is chown(2) with owner and group
// -1, as FUSE sends it: Linux updates the change time and clears the
// set-ID bits of a non-directory even then.
//
// Errors: EPERM (seals), EISDIR or EINVAL (size of a non-regular file),
// EFBIG, ENOSPC.
func (l *Layer) SetAttr(ino uint64, f vfs.File, a vfs.SetAttr) (unix.Stat_t, error) {
	mf, _ := f.(*File) // a File of another file system is no File of ino
	var st unix.Stat_t
	err := l.withFd(ino, func(i *inode, fd int) error {
		if a.Valid&vfs.SetSize != 0 {
			if err := l.truncate(i, mf, a.Size, a.Valid&vfs.KillSuidGid != 0); err != nil {
				return err
			}
		}
		if a.Valid&(vfs.SetUid|vfs.SetGid) != 0 || a.Valid&(vfs.SetMode|vfs.SetSize|vfs.SetAtime|vfs.SetMtime) == 0 {
			uid, gid := -1, -1
			if a.Valid&vfs.SetUid != 0 {
				uid = int(a.Uid)
			}
			if a.Valid&vfs.SetGid != 0 {
				gid = int(a.Gid)
			}
			if err := unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH); err != nil {
				return Errno(err)
			}
		}
		if a.Valid&vfs.SetMode != 0 {
			if i.fileType == unix.S_IFLNK {
				return syscall.EOPNOTSUPP
			}
			if err := fchmodEmpty(fd, a.Mode&07777); err != nil {
				return err
			}
		}
		if a.Valid&(vfs.SetAtime|vfs.SetMtime) != 0 {
			ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
			if a.Valid&vfs.SetAtime != 0 {
				ts[0] = a.Atime
			}
			if a.Valid&vfs.SetMtime != 0 {
				ts[1] = a.Mtime
			}
			if err := unix.UtimesNanoAt(fd, "", ts, unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW); err != nil {
				return Errno(err)
			}
		}
		return Errno(unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH))
	})
	return st, err
}

// truncate sets the size of the regular file i, obeying its seals.
func (l *Layer) truncate(i *inode, f *File, size int64, kill bool) error {
	switch {
	case i.fileType == unix.S_IFDIR:
		return syscall.EISDIR
	case i.fileType != unix.S_IFREG:
		return syscall.EINVAL
	case size < 0:
		return syscall.EINVAL
	}
	fd := -1
	if f != nil && f.i == i && f.writable {
		fd = f.fd
	} else {
		var err error
		if fd, err = l.openInode(i, unix.O_WRONLY); err != nil {
			return err
		}
		defer unix.Close(fd)
	}

	i.mu.Lock()
	defer i.mu.Unlock()
	seals, err := l.sealsLocked(i)
	if err != nil {
		return err
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return Errno(err)
	}
	if (size > st.Size && seals&SealGrow != 0) || (size < st.Size && seals&SealShrink != 0) {
		return l.sealDenied()
	}
	if kill {
		if err := killSuidGid(fd, st.Mode); err != nil {
			return err
		}
	}
	return Errno(unix.Ftruncate(fd, size))
}

// killSuidGid clears the set-user-ID bit of a file with mode, and its
// set-group-ID bit if it is group-executable, as Linux does when a process
// without CAP_FSETID writes or truncates it.
func killSuidGid(fd int, mode uint32) error {
	kill := uint32(unix.S_ISUID)
	if mode&unix.S_IXGRP != 0 {
		kill |= unix.S_ISGID
	}
	if mode&kill == 0 {
		return nil
	}
	return fchmodEmpty(fd, mode&07777&^kill)
}

// fchmodEmpty changes the mode of the inode open as fd (an O_PATH
// descriptor will do) with fchmodat2(fd, "", mode, AT_EMPTY_PATH).
func fchmodEmpty(fd int, mode uint32) error {
	empty := [1]byte{}
	_, _, e := unix.Syscall6(unix.SYS_FCHMODAT2, uintptr(fd), uintptr(unsafe.Pointer(&empty[0])), uintptr(mode), unix.AT_EMPTY_PATH, 0, 0)
	if e != 0 {
		return e
	}
	return nil
}
