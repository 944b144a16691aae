package fusefs

import (
	"encoding/binary"
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Inode flags (chattr(1), lsattr(1)) over FUSE_IOCTL.
//
// The kernel sends FUSE_IOCTL for the file-attribute ioctls
// (FS_IOC_GETFLAGS, FS_IOC_SETFLAGS, FS_IOC_FSGETXATTR, FS_IOC_FSSETXATTR)
// on a file of its own opening (an OPEN or OPENDIR, the IOCTL, a RELEASE),
// after checking the caller's ownership and, to change the immutable or
// append-only flag, CAP_LINUX_IMMUTABLE. The flags live on the backing
// tmpfs inode (vfs.InodeFlags), which therefore enforces them on every
// operation the file system makes for the kernel, and keeps them across a
// takeover. The kernel itself knows nothing of them for a FUSE inode, nor
// that setting them moves the file's ctime, as on tmpfs: a change has it
// forget the file's attributes (xfstests generic/277). Other ioctls are
// ENOTTY.

// FS_IOC_FSGETXATTR and FS_IOC_FSSETXATTR, and the size of their struct
// fsxattr (linux/fs.h), which x/sys/unix does not name.
const (
	iocFsGetXattr = 0x801c581f
	iocFsSetXattr = 0x401c5820
	fsxattrSize   = 28
)

// xflagBits pairs each FS_XFLAG_* that has an FS_*_FL twin with it, as
// the kernel translates them (fs/file_attr.c).
var xflagBits = [...]struct{ xflag, flag uint32 }{
	{0x00000008, 0x00000010}, // IMMUTABLE
	{0x00000010, 0x00000020}, // APPEND
	{0x00000020, 0x00000008}, // SYNC
	{0x00000040, 0x00000080}, // NOATIME
	{0x00000080, 0x00000040}, // NODUMP
	{0x00000200, 0x20000000}, // PROJINHERIT
	{0x00008000, 0x02000000}, // DAX
}

func (r *rawFS) Ioctl(_ <-chan struct{}, in *fuse.IoctlIn, inbuf []byte, out *fuse.IoctlOut, outbuf []byte) fuse.Status {
	start := r.now()
	s := status("IOCTL", r.ioctl(in, inbuf, outbuf))
	if s == fuse.OK && (in.Cmd == unix.FS_IOC_SETFLAGS || in.Cmd == iocFsSetXattr) {
		r.dropAttrs(in.NodeId)
	}
	r.observe("IOCTL", start, s)
	return s
}

func (r *rawFS) ioctl(in *fuse.IoctlIn, inbuf, outbuf []byte) error {
	fl, ok := r.fs.(vfs.InodeFlags)
	if !ok {
		return syscall.ENOTTY
	}
	le := binary.LittleEndian
	switch in.Cmd {
	case unix.FS_IOC_GETFLAGS:
		flags, err := fl.GetFlags(in.NodeId)
		if err != nil {
			return err
		}
		if len(outbuf) < 4 {
			return syscall.EINVAL
		}
		le.PutUint32(outbuf, flags)
	case unix.FS_IOC_SETFLAGS:
		if len(inbuf) < 4 {
			return syscall.EINVAL
		}
		if err := fl.SetFlags(in.NodeId, le.Uint32(inbuf)); err != nil {
			return err
		}
		copy(outbuf, inbuf)
	case iocFsGetXattr:
		flags, err := fl.GetFlags(in.NodeId)
		if err != nil {
			return err
		}
		if len(outbuf) < fsxattrSize {
			return syscall.EINVAL
		}
		clear(outbuf)
		var xflags uint32
		for _, b := range xflagBits {
			if flags&b.flag != 0 {
				xflags |= b.xflag
			}
		}
		le.PutUint32(outbuf, xflags)
	case iocFsSetXattr:
		if len(inbuf) < fsxattrSize {
			return syscall.EINVAL
		}
		// fsx_xflags, fsx_extsize, fsx_nextents, fsx_projid,
		// fsx_cowextsize: a tmpfs file has no extent sizes or projects.
		xflags := le.Uint32(inbuf)
		if le.Uint32(inbuf[4:]) != 0 || le.Uint32(inbuf[12:]) != 0 || le.Uint32(inbuf[16:]) != 0 {
			return syscall.EOPNOTSUPP
		}
		flags, err := fl.GetFlags(in.NodeId)
		if err != nil {
			return err
		}
		for _, b := range xflagBits {
			flags &^= b.flag
			if xflags&b.xflag != 0 {
				flags |= b.flag
				xflags &^= b.xflag
			}
		}
		if xflags != 0 {
			return syscall.EOPNOTSUPP
		}
		if err := fl.SetFlags(in.NodeId, flags); err != nil {
			return err
		}
		copy(outbuf, inbuf)
	default:
		return syscall.ENOTTY
	}
	return nil
}
