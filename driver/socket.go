package driver

import (
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"time"

	"golang.org/x/sys/unix"
)

// The plugin's unix sockets: the CSI endpoint and kubelet's registration
// socket. During a rollout the successor binds the same paths while the
// predecessor still serves, so a socket appears at its path atomically
// (bound under a temporary name, then renamed over whatever was there), and
// a process removes a path on the way out only if the socket there is
// still its own (fileStamp).

// listenSocket listens on a unix socket at path, made 0600 before anyone can
// connect to it and marked (markSocket) before it takes the path, which it
// takes atomically, replacing a socket there. Anything else at path is an
// error. Closing the listener leaves the path alone: by then it may be a
// successor's (removeSocket).
//
// The temporary name starts with a dot: kubelet's plugin watcher ignores
// such files in its plugins_registry directory.
func listenSocket(path string) (net.Listener, error) {
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() != os.ModeSocket {
		return nil, fmt.Errorf("%s exists and is not a socket", path)
	}
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d.tmp", filepath.Base(path), os.Getpid()))
	os.Remove(tmp)
	lis, err := net.Listen("unix", tmp)
	if err != nil {
		return nil, err
	}
	lis.(*net.UnixListener).SetUnlinkOnClose(false)
	err = os.Chmod(tmp, 0o600)
	if err == nil {
		err = markSocket(tmp)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		lis.Close()
		os.Remove(tmp)
		return nil, err
	}
	return lis, nil
}

// fileStamp tells one socket file from another at the same path. The inode
// number alone does not: a successor's socket may get the number of the
// one it replaced. Nor does a time the kernel sets, which ticks by the
// jiffy. markSocket gives each socket a modification time of its own.
type fileStamp struct {
	ino   uint64
	mtime unix.Timespec
}

// socketID identifies the socket file at path, or is zero.
func socketID(path string) fileStamp {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil {
		return fileStamp{}
	}
	return fileStamp{st.Ino, st.Mtim}
}

// markSocket sets the modification time of the socket file at path to the
// current second plus random nanoseconds.
func markSocket(path string) error {
	mtime := unix.NsecToTimespec(time.Now().Truncate(time.Second).UnixNano() + rand.Int64N(int64(time.Second)))
	omit := unix.Timespec{Nsec: unix.UTIME_OMIT}
	if err := unix.UtimesNanoAt(unix.AT_FDCWD, path, []unix.Timespec{omit, mtime}, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return fmt.Errorf("marking socket %s: %w", path, err)
	}
	return nil
}

// removeSocket removes the socket at path if it is still the one stamped
// id: a successor process may have replaced it.
func removeSocket(path string, id fileStamp) {
	if id != (fileStamp{}) && socketID(path) == id {
		os.Remove(path)
	}
}
