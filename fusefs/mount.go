package fusefs

import (
	"fmt"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Options configure a mount.
type Options struct {
	// FsName is the source shown in /proc/mounts, e.g. "csi-memfs:vol-1".
	FsName string
	// ReadOnly mounts read-only.
	ReadOnly bool
	// DisablePassthrough serves every read and write through the daemon
	// even where the kernel offers FUSE passthrough.
	DisablePassthrough bool
	// Observer, if set, is told of every request.
	Observer Observer
	// Debug logs every request and reply (to the standard logger).
	Debug bool
	// Transport chooses how requests reach the server: over io_uring or
	// /dev/fuse alone; the zero value is TransportAuto.
	Transport Transport
	// NoHandover says the connection will never be served by another
	// process (Session, Stop, Adopt), which a connection served over
	// io_uring cannot be: only then does TransportAuto use io_uring.
	NoHandover bool
}

// Observer receives one call per FUSE request served, after the reply.
type Observer interface {
	// ObserveOp reports a request's operation name (upper case, as in
	// "LOOKUP", "READ"), how long serving it took, and its errno (0 on
	// success).
	ObserveOp(op string, d time.Duration, errno syscall.Errno)
}

// Server serves one vfs.FS on one mountpoint.
type Server struct {
	raw        *rawFS
	sess       *session
	mountpoint string
}

// capHandleKillprivV2 has the kernel leave clearing set-ID bits on write,
// truncate and chown to us, which spares a GETXATTR round trip on every
// write (go-fuse does not name the bit).
const capHandleKillprivV2 = 1 << 28

// mountOptions are what go-fuse's ProtocolServer needs to answer INIT.
// They must not change between the server that mounted a connection and
// the servers that take it over.
func mountOptions(opts Options) *fuse.MountOptions {
	mo := &fuse.MountOptions{
		// With passthrough the daemon rarely moves data, and a request
		// buffer is MaxWrite: 128 KiB then, 1 MiB when every byte comes
		// through here.
		MaxWrite:      128 << 10,
		MaxReadAhead:  1 << 20,
		MaxBackground: 64,
		// Plain READDIR: READDIRPLUS measured 13x slower here.
		DisableReadDirPlus:   true,
		EnableSymlinkCaching: true,
		ExtraCapabilities:    capHandleKillprivV2 | fuse.CAP_DIRECT_IO_ALLOW_MMAP,
		Debug:                opts.Debug,
	}
	if opts.DisablePassthrough {
		mo.DisabledCapabilities |= fuse.CAP_PASSTHROUGH
		mo.MaxWrite = 1 << 20
	}
	return mo
}

// Mount mounts fs on mountpoint (an existing directory) and serves it until
// Unmount or Stop. Data moves by FUSE passthrough where the kernel allows
// it (Linux >= 6.9, CAP_SYS_ADMIN); else through this process.
func Mount(mountpoint string, fs vfs.FS, opts Options) (*Server, error) {
	name := opts.FsName
	if name == "" {
		name = "csi-memfs"
	}
	ring, err := offerRing(opts)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	mo := mountOptions(opts)
	if ring {
		mo.ExtraCapabilities |= fuse.CAP_OVER_IO_URING
	}
	var st unix.Stat_t
	if err := unix.Stat(mountpoint, &st); err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	handles, err := newHandleTable()
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	dev, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		handles.close()
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	flags := uintptr(unix.MS_NOSUID | unix.MS_NODEV)
	if opts.ReadOnly {
		flags |= unix.MS_RDONLY
	}
	// Pods of any uid use the volume (allow_other); the kernel checks
	// permissions against the attributes we report (default_permissions).
	data := fmt.Sprintf("fd=%d,rootmode=%o,user_id=0,group_id=0,max_read=%d,allow_other,default_permissions",
		dev, st.Mode&unix.S_IFMT, mo.MaxWrite)
	if err := unix.Mount(name, mountpoint, "fuse.memfs", flags, data); err != nil {
		unix.Close(dev)
		handles.close()
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	raw := newRawFS(fs, opts, handles)
	s, err := newSession(dev, raw, mo)
	if err == nil {
		err = s.readInit()
	}
	if err == nil && ring {
		err = s.acceptRing(opts)
	}
	if err != nil {
		unix.Unmount(mountpoint, unix.MNT_DETACH)
		if s != nil {
			s.close()
		}
		handles.close()
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	s.serve()
	pollHack(mountpoint)
	srv := &Server{raw: raw, sess: s, mountpoint: mountpoint}
	klog.InfoS("Serving a FUSE mount", "fsName", name, "mountpoint", mountpoint, "transport", srv.Transport())
	return srv, nil
}

// pollHackName is a name go-fuse's ProtocolServer answers itself
// (fuse/poll.go).
const pollHackName = ".go-fuse-epoll-hack"

// pollHack has the kernel send one POLL, which go-fuse answers ENOSYS, so
// that it never sends another on this connection. Otherwise a process
// that serves a mount and opens a file on it can hang: the Go runtime
// adds every file it opens to its epoll set, and for a FUSE file
// epoll_ctl waits for the answer to a POLL request. With the hack
// removed, posixtest's DirSeek without passthrough hung in our tests,
// although the readers wait in an epoll set of their own; the likely
// cause is that the runtime makes that epoll_ctl without giving up its
// P, so a garbage collection, which must stop every P, waits for it
// while the reader that would answer waits for the collection.
func pollHack(mountpoint string) {
	fd, err := unix.Open(mountpoint+"/"+pollHackName, unix.O_RDONLY|unix.O_CLOEXEC, 0)
	if err != nil {
		return
	}
	unix.Poll([]unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN | unix.POLLPRI | unix.POLLOUT}}, 0)
	unix.Close(fd)
}

// Passthrough says whether opens are being answered with FUSE passthrough.
// It turns false for good when the kernel refuses a backing file.
func (s *Server) Passthrough() bool { return s.raw.passthroughActive() }

// Unmount unmounts the file system and waits until serving has ended. If
// the mount is busy it is detached: it disappears from the namespace now
// and the kernel ends the connection when the last open file closes.
func (s *Server) Unmount() error {
	err := unix.Unmount(s.mountpoint, 0)
	if err == unix.EBUSY {
		err = unix.Unmount(s.mountpoint, unix.MNT_DETACH)
	}
	if err != nil && err != unix.EINVAL {
		return fmt.Errorf("fusefs: unmount %s: %w", s.mountpoint, err)
	}
	s.sess.wait()
	s.close()
	return nil
}

// close drops what the server holds: open files and directories, the
// handle table and the device descriptor.
func (s *Server) close() {
	s.raw.releaseAll()
	s.raw.handles.close()
	if s.sess.ring != nil {
		s.sess.ring.close()
	}
	s.sess.close()
}

// Wait blocks until the connection has ended (the file system was
// unmounted) or Stop.
func (s *Server) Wait() { s.sess.wait() }
