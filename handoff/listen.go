package handoff

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// A Listener accepts handoff connections on a unix socket.
type Listener struct {
	ul *net.UnixListener
	// path is the socket's path. Immutable.
	path string
	// stamp identifies the socket file. Immutable.
	stamp Stamp
}

// Listen listens on the unix socket path, replacing any socket there in
// one step (ListenUnix). A client connecting meanwhile reaches either the
// old listener or this one.
func Listen(path string) (*Listener, error) {
	ul, stamp, err := ListenUnix("unixpacket", path)
	if err != nil {
		return nil, fmt.Errorf("handoff: %w", err)
	}
	return &Listener{ul: ul, path: path, stamp: stamp}, nil
}

// ListenUnix listens on a unix socket of network ("unix" or "unixpacket")
// at path, replacing a socket there in one step: it binds a temporary name
// in path's directory (a dot-name, which kubelet's plugin watcher ignores),
// makes it mode 0600, marks it (Stamp) and renames it over path. So the
// path never goes missing, and a successor process can bind the same path
// while this one still serves. Closing the listener never unlinks the path;
// RemoveSocket removes it only if it is still this socket. Anything but a
// socket at path is an error.
func ListenUnix(network, path string) (*net.UnixListener, Stamp, error) {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o750); err != nil {
		return nil, Stamp{}, fmt.Errorf("listen on %s: %w", path, err)
	}
	if fi, err := os.Lstat(path); err == nil && fi.Mode().Type() != os.ModeSocket {
		return nil, Stamp{}, fmt.Errorf("listen on %s: it exists and is not a socket", path)
	}
	var ul *net.UnixListener
	var tmp string
	for try := 0; ; try++ {
		tmp = filepath.Join(dir, fmt.Sprintf(".%s-%08x.tmp", filepath.Base(path), rand.Uint32()))
		var err error
		ul, err = net.ListenUnix(network, &net.UnixAddr{Name: tmp, Net: network})
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EADDRINUSE) || try == 3 {
			return nil, Stamp{}, fmt.Errorf("listen on %s: %w", path, err)
		}
	}
	// The name is about to change; Close must not unlink a successor's.
	ul.SetUnlinkOnClose(false)
	err := os.Chmod(tmp, 0o600)
	if err == nil {
		err = mark(tmp)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		ul.Close()
		os.Remove(tmp)
		return nil, Stamp{}, fmt.Errorf("listen on %s: %w", path, err)
	}
	return ul, StampAt(path), nil
}

// Stamp tells one socket file from another at the same path. The inode
// number alone does not: once a listener is closed, a successor's socket
// may get its number. Nor does a time the kernel sets, which ticks by the
// jiffy. ListenUnix gives each socket a modification time of its own.
type Stamp struct {
	ino   uint64
	mtime unix.Timespec
}

// StampAt returns the stamp of the socket file at path; zero if there is
// none.
func StampAt(path string) Stamp {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil {
		return Stamp{}
	}
	return Stamp{st.Ino, st.Mtim}
}

// mark sets the modification time of the file at path to the current
// second plus random nanoseconds.
func mark(path string) error {
	mtime := unix.NsecToTimespec(time.Now().Truncate(time.Second).UnixNano() + rand.Int64N(int64(time.Second)))
	omit := unix.Timespec{Nsec: unix.UTIME_OMIT}
	return unix.UtimesNanoAt(unix.AT_FDCWD, path, []unix.Timespec{omit, mtime}, unix.AT_SYMLINK_NOFOLLOW)
}

// RemoveSocket removes the socket at path if it is still the one stamped
// s: a successor process may have replaced it.
func RemoveSocket(path string, s Stamp) {
	if s != (Stamp{}) && StampAt(path) == s {
		os.Remove(path)
	}
}

// Path returns the socket's path.
func (l *Listener) Path() string { return l.path }

// Accept waits for the next connection.
func (l *Listener) Accept() (*Conn, error) {
	uc, err := l.ul.AcceptUnix()
	if err != nil {
		return nil, fmt.Errorf("handoff: accept on %s: %w", l.path, err)
	}
	return &Conn{uc: uc}, nil
}

// Close stops listening. The socket file stays (see the package doc).
func (l *Listener) Close() error { return l.ul.Close() }

// owns says whether the socket at the path is still this listener's: a
// newer Listen on the same path replaces it.
func (l *Listener) owns() bool { return StampAt(l.path) == l.stamp }

// abandoned says whether nothing listens on path: no socket is there, or
// its listener is gone (a connection is refused). A connection that sends
// nothing is no client to a Holder (see Holder.serveConn).
func abandoned(path string) bool {
	c, err := net.Dial("unixpacket", path)
	if err != nil {
		return errors.Is(err, syscall.ECONNREFUSED) || errors.Is(err, syscall.ENOENT)
	}
	c.Close()
	return false
}
