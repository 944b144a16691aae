package memfs

import (
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// GetAttr returns the attributes of ino.
func (l *Layer) GetAttr(ino uint64) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := l.withFd(ino, func(_ *inode, fd int) error {
		return Errno(unix.Fstatat(fd, "", &st, unix.AT_EMPTY_PATH))
	})
	return st, err
}

// AttrMask says which fields of a SetAttr apply.
type AttrMask uint32

// The bits of AttrMask.
const (
	SetMode AttrMask = 1 << iota
	SetUid
	SetGid
	SetSize
	SetAtime
	SetMtime
	// KillSuidGid clears the set-user-ID bit, and the set-group-ID bit of a
	// group-executable file, with a size change: set it when the caller
	// lacks CAP_FSETID, as Linux does on truncate.
	KillSuidGid
)

// SetAttr is a change of attributes.
type SetAttr struct {
	Valid AttrMask
	// Mode holds the permission bits, including set-ID and sticky bits.
	Mode     uint32
	Uid, Gid uint32
	Size     int64
	// Atime and Mtime may carry unix.UTIME_NOW in Nsec.
	Atime, Mtime unix.Timespec
}

// SetAttr changes the attributes of ino as a.Valid says, in the order size,
// owner, mode, times, and returns the attributes after the change. If f is
// an open writable File of ino, a size change uses it.
//
// A size change obeys the seals: EPERM if it grows a grow-sealed or shrinks
// a shrink-sealed file. A change of owner clears set-ID bits as chown(2)
// does. A SetAttr that changes nothing is chown(2) with owner and group
// -1, as FUSE sends it: Linux updates the change time and clears the
// set-ID bits of a non-directory even then.
//
// Errors: EPERM (seals), EISDIR or EINVAL (size of a non-regular file),
// EFBIG, ENOSPC.
func (l *Layer) SetAttr(ino uint64, f *File, a SetAttr) (unix.Stat_t, error) {
	var st unix.Stat_t
	err := l.withFd(ino, func(i *inode, fd int) error {
		if a.Valid&SetSize != 0 {
			if err := l.truncate(i, f, a.Size, a.Valid&KillSuidGid != 0); err != nil {
				return err
			}
		}
		if a.Valid&(SetUid|SetGid) != 0 || a.Valid&(SetMode|SetSize|SetAtime|SetMtime) == 0 {
			uid, gid := -1, -1
			if a.Valid&SetUid != 0 {
				uid = int(a.Uid)
			}
			if a.Valid&SetGid != 0 {
				gid = int(a.Gid)
			}
			if err := unix.Fchownat(fd, "", uid, gid, unix.AT_EMPTY_PATH); err != nil {
				return Errno(err)
			}
		}
		if a.Valid&SetMode != 0 {
			if i.fileType == unix.S_IFLNK {
				return syscall.EOPNOTSUPP
			}
			if err := fchmodEmpty(fd, a.Mode&07777); err != nil {
				return err
			}
		}
		if a.Valid&(SetAtime|SetMtime) != 0 {
			ts := []unix.Timespec{{Nsec: unix.UTIME_OMIT}, {Nsec: unix.UTIME_OMIT}}
			if a.Valid&SetAtime != 0 {
				ts[0] = a.Atime
			}
			if a.Valid&SetMtime != 0 {
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
