package fusefs

import (
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Statx answers FUSE_STATX, which the kernel (Linux >= 6.6) sends instead
// of GETATTR when a statx(2) asks for more than the basic attributes: here
// for the birth time (STATX_BTIME), which the file system's BirthTimer
// knows. Without one the kernel gets the basic attributes alone. The
// kernel keeps the birth time with the inode's other attributes, so a
// STATX costs a round trip only where a GETATTR would.
func (r *rawFS) Statx(_ <-chan struct{}, in *fuse.StatxIn, out *fuse.StatxOut) fuse.Status {
	start := r.now()
	st, err := r.getAttr(in.NodeId, in.GetattrFlags, in.Fh)
	var (
		btime unix.Timespec
		known bool
	)
	if bt, ok := r.fs.(vfs.BirthTimer); ok && err == nil {
		btime, known, err = bt.BirthTime(in.NodeId)
	}
	s := status("STATX", err)
	if s == fuse.OK {
		fillStatx(&out.Statx, &st)
		if known {
			out.Mask |= unix.STATX_BTIME
			out.Btime.Sec, out.Btime.Nsec = uint64(btime.Sec), uint32(btime.Nsec)
		}
		out.SetTimeout(r.attrTimeout(in.NodeId))
	}
	r.observe("STATX", start, s)
	return s
}

// fillStatx fills the basic statx attributes from st.
func fillStatx(sx *fuse.Statx, st *unix.Stat_t) {
	sx.Mask = unix.STATX_BASIC_STATS
	sx.Blksize = uint32(st.Blksize)
	sx.Nlink = uint32(st.Nlink)
	sx.Uid, sx.Gid = st.Uid, st.Gid
	sx.Mode = uint16(st.Mode)
	sx.Ino = st.Ino
	sx.Size = uint64(st.Size)
	sx.Blocks = uint64(st.Blocks)
	sx.Atime.Sec, sx.Atime.Nsec = uint64(st.Atim.Sec), uint32(st.Atim.Nsec)
	sx.Mtime.Sec, sx.Mtime.Nsec = uint64(st.Mtim.Sec), uint32(st.Mtim.Nsec)
	sx.Ctime.Sec, sx.Ctime.Nsec = uint64(st.Ctim.Sec), uint32(st.Ctim.Nsec)
	sx.RdevMajor, sx.RdevMinor = unix.Major(st.Rdev), unix.Minor(st.Rdev)
}
