package fusefs

import (
	"fmt"
	"sync/atomic"
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
	// Subtype makes the mount's type "fuse.Subtype" ("fuse.memfs" if
	// empty). Only Mount uses it: an adopted mount keeps its type.
	Subtype string
	// ReadOnly mounts read-only (a read-only superblock: reads do not
	// make the kernel drop cached atimes, which spares a GETATTR per
	// file read).
	ReadOnly bool
	// NoOpen, with ReadOnly, has the kernel open files without asking
	// (FUSE_NO_OPEN_SUPPORT): no OPEN and RELEASE per open, and what was
	// read stays in the FUSE page cache, so that a file read again costs
	// no request. The price: no passthrough, so a file's first read comes
	// through this process, and the pages read are cached twice (above
	// the tmpfs or lower file's own). For volumes of many small files
	// read often (BENCHMARKS.md, "Metadata at kernel speed").
	NoOpen bool
	// DisablePassthrough serves every read and write through the daemon
	// even where the kernel offers FUSE passthrough.
	DisablePassthrough bool
	// Observer, if set, is told of every request.
	Observer Observer
	// Debug logs every request and reply (to the standard logger).
	Debug bool
	// UnmountGrace is how long Unmount waits for the files still open on
	// a busy mount to close before it ends the connection. Zero means
	// DefaultUnmountGrace.
	UnmountGrace time.Duration
	// Transport chooses how requests reach the server: over io_uring or
	// /dev/fuse alone; the zero value is TransportAuto.
	Transport Transport
	// NoHandover says the connection will never be served by another
	// process (Session, Stop, Adopt), which a connection served over
	// io_uring cannot be: only then does TransportAuto use io_uring.
	NoHandover bool

	// disabledCaps are capabilities Mount does not take although this
	// version would: the tests mount as an older server did, to take the
	// connection over with this one.
	disabledCaps uint64
}

// DefaultUnmountGrace is the UnmountGrace of Options that set none.
const DefaultUnmountGrace = 2 * time.Second

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
	// dev is the mount's device number, which names its connection to
	// fusectl, or 0 if unknown. Immutable.
	dev uint64
	// forced says Unmount ended the connection with files still open.
	forced atomic.Bool
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
		// POSIX ACLs: the kernel checks access with them and caches
		// them, absent ones too. The kernel then leaves the umask to
		// us (FUSE_DONT_MASK), which must not apply it where a
		// default ACL takes its place (memfs does both).
		EnableAcl: true,
		// READDIRPLUS in the kernel's automatic mode: the first chunk of
		// a directory, and later ones when its entries are being looked
		// up (BENCHMARKS.md, "Metadata at kernel speed").
		EnableSymlinkCaching: true,
		ExtraCapabilities:    capHandleKillprivV2 | fuse.CAP_DIRECT_IO_ALLOW_MMAP | fuse.CAP_READDIRPLUS_AUTO | fuse.CAP_DONT_MASK,
		Debug:                opts.Debug,
	}
	// File handles of forgotten inodes are decoded with LOOKUP of "." and
	// ".." (rawfs_export.go). SETXATTR says when setting an access ACL
	// clears the set-group-ID bit (rawFS.killSGID).
	mo.ExtraCapabilities |= fuse.CAP_EXPORT_SUPPORT | fuse.CAP_SETXATTR_EXT
	mo.DisabledCapabilities |= opts.disabledCaps
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
	name, subtype := opts.FsName, opts.Subtype
	if name == "" {
		name = "csi-memfs"
	}
	if subtype == "" {
		subtype = "memfs"
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
	if err := unix.Mount(name, mountpoint, "fuse."+subtype, flags, data); err != nil {
		unix.Close(dev)
		handles.close()
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	raw := newRawFS(rederiving(fs), opts, handles)
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
	srv := &Server{raw: raw, sess: s, mountpoint: mountpoint, dev: mountDev(mountpoint)}
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

// Panics returns how many requests' handlers have panicked on this
// server's connection. Each was answered EIO and logged once.
func (s *Server) Panics() uint64 { return s.sess.panics.Load() }

// Unmount unmounts the file system and ends serving, within about
// Options.UnmountGrace whatever is open. A busy mount is detached: it
// leaves the namespace at once, and the kernel ends the connection when
// the last open file closes. If files are still open after the grace
// period, Unmount ends the connection itself (abortConnection) and Forced
// turns true: requests on those files fail from then on (ENOTCONN, EIO),
// but reads and writes of a passthrough open still reach its backing
// file, which the kernel holds until the file is closed.
func (s *Server) Unmount() error {
	err := unix.Unmount(s.mountpoint, 0)
	if err == unix.EBUSY {
		err = unix.Unmount(s.mountpoint, unix.MNT_DETACH)
	}
	if err != nil && err != unix.EINVAL {
		return fmt.Errorf("fusefs: unmount %s: %w", s.mountpoint, err)
	}
	grace := s.raw.opts.UnmountGrace
	if grace == 0 {
		grace = DefaultUnmountGrace
	}
	timer := time.NewTimer(grace)
	defer timer.Stop()
	select {
	case <-s.sess.done:
	case <-timer.C:
		// Checked first so that a number the kernel has just freed, and
		// may give to another mount, is not aborted.
		if !s.sess.ended() {
			s.forced.Store(true)
			klog.InfoS("Ending a FUSE connection with files still open", "fsName", s.raw.opts.FsName, "mountpoint", s.mountpoint, "grace", grace)
			if err := abortConnection(s.dev); err != nil {
				// Stop serving instead: closing our descriptor ends the
				// connection unless a holder keeps a copy of it.
				klog.ErrorS(err, "Could not abort a FUSE connection; no longer serving it", "fsName", s.raw.opts.FsName, "mountpoint", s.mountpoint)
				s.sess.wakeAll()
			}
		}
		s.sess.wait()
	}
	s.close()
	return nil
}

// Forced says whether Unmount ended the connection while files were still
// open on it (see Unmount).
func (s *Server) Forced() bool { return s.forced.Load() }

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
