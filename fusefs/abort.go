package fusefs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strconv"

	"golang.org/x/sys/unix"
)

// Ending a connection that open files keep alive after its mount is gone:
// the kernel's fusectl file system has a directory per FUSE connection,
// named by the minor number of the mount's device, whose "abort" file ends
// it (Documentation/filesystems/fuse.rst, "Aborting a filesystem
// connection").

// fusectlDir is where fusectl is mounted.
const fusectlDir = "/sys/fs/fuse/connections"

// fusectlMagic is fusectl's statfs type (FUSE_CTL_SUPER_MAGIC), and
// fuseMagic FUSE's (FUSE_SUPER_MAGIC).
const (
	fusectlMagic = 0x65735543
	fuseMagic    = 0x65735546
)

// mountDev returns the device number of the FUSE mount on mountpoint, or
// 0 if mountpoint is not one.
func mountDev(mountpoint string) uint64 {
	var sfs unix.Statfs_t
	var st unix.Stat_t
	if unix.Statfs(mountpoint, &sfs) != nil || sfs.Type != fuseMagic || unix.Stat(mountpoint, &st) != nil {
		return 0
	}
	return st.Dev
}

// abortConnection ends the FUSE connection of the mount whose device is
// dev: every request waiting is failed, readers of /dev/fuse get
// ECONNABORTED, and new requests fail with ENOTCONN. It mounts fusectl on
// fusectlDir if nothing is mounted there (a container's /sys).
func abortConnection(dev uint64) error {
	if dev == 0 {
		return errors.New("the connection's device number is unknown")
	}
	abort := filepath.Join(fusectlDir, strconv.FormatUint(uint64(unix.Minor(dev)), 10), "abort")
	err := writeAbort(abort)
	if errors.Is(err, os.ErrNotExist) {
		var sfs unix.Statfs_t
		if unix.Statfs(fusectlDir, &sfs) == nil && sfs.Type == fusectlMagic {
			return err // mounted, and the connection is gone
		}
		if err := unix.Mount("fusectl", fusectlDir, "fusectl", 0, ""); err != nil {
			return fmt.Errorf("mounting fusectl on %s: %w", fusectlDir, err)
		}
		err = writeAbort(abort)
	}
	return err
}

// writeAbort writes to a connection's abort file.
func writeAbort(path string) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	_, err = f.WriteString("1")
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}
