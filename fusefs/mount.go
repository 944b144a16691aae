package fusefs

import (
	"errors"
	"fmt"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
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
}

// Observer receives one call per FUSE request served, after the reply.
type Observer interface {
	// ObserveOp reports a request's operation name (upper case, as in
	// "LOOKUP", "READ"), how long serving it took, and its errno (0 on
	// success).
	ObserveOp(op string, d time.Duration, errno syscall.Errno)
}

// Server serves one FileSystem on one mountpoint.
type Server struct {
	raw        *rawFS
	srv        *fuse.Server
	mountpoint string
}

// capHandleKillprivV2 has the kernel leave clearing set-ID bits on write,
// truncate and chown to us, which spares a GETXATTR round trip on every
// write (go-fuse does not name the bit).
const capHandleKillprivV2 = 1 << 28

// Mount mounts fs on mountpoint (an existing directory) and serves it until
// Unmount. Data moves by FUSE passthrough where the kernel allows it (Linux
// >= 6.9, CAP_SYS_ADMIN); else through this process.
func Mount(mountpoint string, fs FileSystem, opts Options) (*Server, error) {
	name := opts.FsName
	if name == "" {
		name = "csi-memfs"
	}
	flags := uintptr(syscall.MS_NOSUID | syscall.MS_NODEV)
	if opts.ReadOnly {
		flags |= syscall.MS_RDONLY
	}
	mo := &fuse.MountOptions{
		// Pods of any uid use the volume; the kernel checks permissions
		// against the attributes we report.
		AllowOther: true,
		Options:    []string{"default_permissions"},
		FsName:     name,
		Name:       "memfs",
		// Mount with mount(2) (we are privileged): no fusermount.
		DirectMountStrict: true,
		DirectMountFlags:  flags,
		// With passthrough the daemon rarely moves data, and go-fuse keeps
		// request buffers of MaxWrite per reader: 128 KiB then (about 3 MiB
		// less heap per volume), 1 MiB when every byte comes through here.
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
	raw := newRawFS(fs, opts)
	srv, err := fuse.NewServer(raw, mountpoint, mo)
	if err != nil {
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	go srv.Serve()
	if err := srv.WaitMount(); err != nil {
		srv.Unmount()
		return nil, fmt.Errorf("fusefs: mount %s: %w", mountpoint, err)
	}
	return &Server{raw: raw, srv: srv, mountpoint: mountpoint}, nil
}

// Passthrough says whether opens are being answered with FUSE passthrough.
// It turns false for good when the kernel refuses a backing file.
func (s *Server) Passthrough() bool { return s.raw.passthroughActive() }

// Unmount unmounts the file system and waits until serving has ended. If
// the mount is busy it is detached: it disappears from the namespace now
// and the kernel ends the connection when the last open file closes.
func (s *Server) Unmount() error {
	err := s.srv.Unmount()
	if err != nil && errors.Is(err, syscall.EBUSY) {
		err = syscall.Unmount(s.mountpoint, syscall.MNT_DETACH)
	}
	if err != nil {
		return fmt.Errorf("fusefs: unmount %s: %w", s.mountpoint, err)
	}
	s.srv.Wait()
	return nil
}

// Wait blocks until the file system is unmounted.
func (s *Server) Wait() { s.srv.Wait() }
