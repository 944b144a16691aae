package memfs

import "golang.org/x/sys/unix"

// BirthTime returns the creation time tmpfs keeps for ino; ok is always
// true.
func (l *Layer) BirthTime(ino uint64) (unix.Timespec, bool, error) {
	var stx unix.Statx_t
	err := l.withFd(ino, func(_ *inode, fd int) error {
		return Errno(unix.Statx(fd, "", unix.AT_EMPTY_PATH|unix.AT_SYMLINK_NOFOLLOW|unix.AT_STATX_DONT_SYNC, unix.STATX_BTIME, &stx))
	})
	if err != nil || stx.Mask&unix.STATX_BTIME == 0 {
		return unix.Timespec{}, false, err
	}
	return unix.Timespec{Sec: stx.Btime.Sec, Nsec: int64(stx.Btime.Nsec)}, true, nil
}
