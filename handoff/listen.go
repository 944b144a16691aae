package handoff

import (
	"errors"
	"fmt"
	"math/rand/v2"
	"net"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"
)

// A Listener accepts handoff connections on a unix socket.
type Listener struct {
	ul *net.UnixListener
	// path is the socket's path. Immutable.
	path string
	// ino is the socket file's inode number. Immutable. While the
	// listener is open the socket holds its file, so no other file at
	// path can have this number (owns).
	ino uint64
}

// Listen listens on the unix socket path, replacing any socket there in
// one step: it binds a temporary name in path's directory, makes it mode
// 0600 and renames it over path. A client connecting meanwhile reaches
// either the old listener or this one.
func Listen(path string) (*Listener, error) {
	dir := filepath.Dir(path)
	var ul *net.UnixListener
	var tmp string
	for try := 0; ; try++ {
		tmp = filepath.Join(dir, fmt.Sprintf(".handoff-%08x.sock", rand.Uint32()))
		var err error
		ul, err = net.ListenUnix("unixpacket", &net.UnixAddr{Name: tmp, Net: "unixpacket"})
		if err == nil {
			break
		}
		if !errors.Is(err, syscall.EADDRINUSE) || try == 3 {
			return nil, fmt.Errorf("handoff: listen on %s: %w", path, err)
		}
	}
	// The name is about to change; Close must not unlink a successor's.
	ul.SetUnlinkOnClose(false)
	var st unix.Stat_t
	err := os.Chmod(tmp, 0o600)
	if err == nil {
		err = unix.Lstat(tmp, &st)
	}
	if err == nil {
		err = os.Rename(tmp, path)
	}
	if err != nil {
		ul.Close()
		os.Remove(tmp)
		return nil, fmt.Errorf("handoff: listen on %s: %w", path, err)
	}
	return &Listener{ul: ul, path: path, ino: st.Ino}, nil
}

// owns says whether the socket at the path is still this listener's: a
// newer Listen on the same path replaces it.
func (l *Listener) owns() bool {
	var st unix.Stat_t
	return unix.Lstat(l.path, &st) == nil && st.Ino == l.ino
}

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
