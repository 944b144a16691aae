package memfs

import (
	"syscall"

	"golang.org/x/sys/unix"
)

// Memory outside size. tmpfs bounds file data by its size= alone; inodes
// and extended attributes it charges only to its inode space, nr_inodes
// KiB (BOGO_INODE_SIZE each): an inode or an extra hard link takes 1 KiB,
// an xattr 40 + len(name) + len(value) bytes (simple_xattr_space), and
// statfs shows the space used as f_files - f_ffree, in KiB. The kernel
// memory behind that space is more than it says: about 1.1 KiB of slab per
// empty file, and up to twice an xattr's charge, since kmalloc rounds its
// allocation up to a power of two (docs/limits.md has the figures).
//
// So memfs counts metaCost bytes of size for every byte of inode space in
// use, and takes them off the data limit: the instance is mounted with
// size = Options.Size - reserved, where reserved covers that charge.
// Before an operation that takes inode space (a create, a link, a user
// setxattr) reserveMeta grows reserved, by remounting, to cover it, or
// fails with ENOSPC when data and metadata together would pass Size;
// StatFS gives back what reserved holds beyond the charge. The kernel
// counts the space, so nothing is to be rebuilt after a restart: Open
// finds reserved in the instance's own size. Data, inodes and xattrs
// together stay within Size (concurrent operations may pass it by what
// they take between the check and the call), and df shows them all.

const (
	// bogoInode is tmpfs's inode space unit, BOGO_INODE_SIZE.
	bogoInode = 1024
	// metaCost is the bytes of size charged for each byte of inode space
	// in use.
	metaCost = 2
	// xattrSpace is the inode space of an xattr beside its name and
	// value (simple_xattr_space).
	xattrSpace = 40
	// metaSlack is inode space counted for every operation beside what it
	// asks for, for what the kernel may add unasked: a security module's
	// label of a new inode (security.selinux is 40 + 17 + about 30
	// bytes). It only makes reserveMeta ask statfs sooner.
	metaSlack = 256
)

// metaUsed returns the bytes of size charged for the inode space st
// reports in use.
func metaUsed(st *unix.Statfs_t) int64 {
	return int64(st.Files-st.Ffree) * bogoInode * metaCost
}

// metaChunk returns the step in which reserved changes for an instance of
// size bytes: 1/256 of it, between 16 KiB and 1 MiB, in whole pages. A
// remount costs about 13 us.
func metaChunk(size int64) int64 {
	c := min(max(size/256, 16<<10), 1<<20)
	return c &^ (pageSize - 1)
}

func roundUp(n, to int64) int64 { return (n + to - 1) / to * to }

// reserveMeta makes reserved cover the inode space in use and ispace bytes
// more, for an operation about to take them.
//
// Knowing the space in use costs a statfs, which reserveMeta spares while
// metaRoom covers the operation: what statfs last showed free of reserved,
// less what was charged since (with metaSlack each). Every way memfs takes
// inode space is charged (reserveMeta, chargeMeta); what unlinks free only
// makes metaRoom an underestimate. So reserveMeta decides on statfs's
// figures as before, only less often. Operations that charge while the
// statfs that refreshes metaRoom is under way may go uncounted, as their
// consumption may pass reserved between check and call anyway.
//
// Errors: ENOSPC (data and metadata would pass the size limit).
func (l *Layer) reserveMeta(ispace int64) error {
	if l.metaRoom.Add(-(ispace+metaSlack)*metaCost) >= 0 {
		return nil
	}
	l.limitsMu.Lock()
	defer l.limitsMu.Unlock()
	var st unix.Statfs_t
	if err := unix.Fstatfs(l.rootFd, &st); err != nil {
		return Errno(err)
	}
	need := metaUsed(&st) + ispace*metaCost
	if need > l.reserved.Load() {
		l.mu.Lock()
		o := l.opts
		l.mu.Unlock()
		if err := l.remountLocked(o, roundUp(need, metaChunk(o.Size))); err != nil {
			return syscall.ENOSPC
		}
	}
	l.metaRoom.Store(l.reserved.Load() - need)
	return nil
}

// chargeMeta counts ispace bytes of inode space that an operation takes
// without reserving them (an internal marker) against metaRoom, so that
// the next reserveMeta that needs them asks statfs.
func (l *Layer) chargeMeta(ispace int64) {
	l.metaRoom.Add(-ispace * metaCost)
}

// remountLocked sets the instance's limits to o, with reserved bytes of
// o.Size kept for metadata.
//
// Preconditions:
//   - l.limitsMu is locked.
//
// Errors: EINVAL (o's limits are below what is in use).
func (l *Layer) remountLocked(o Options, reserved int64) error {
	if reserved >= o.Size {
		return syscall.EINVAL
	}
	d := o
	d.Size -= reserved
	if err := unix.Mount("", l.dir, "", unix.MS_REMOUNT|mountFlags, tmpfsData(d)); err != nil {
		return Errno(err)
	}
	l.reserved.Store(reserved)
	l.metaRoom.Store(0) // the next reserveMeta asks statfs
	return nil
}

// StatFS reports the instance's statfs as df shows it: Options.Size as
// the block limit, and as used blocks the file data and the room kept for
// the charge of inodes and xattrs (see metaCost), which is the charge
// rounded up to a step (metaChunk); what is free is what data may still
// take. The inode figures are the instance's. StatFS first gives back to
// the data limit what the metadata no longer needs.
func (l *Layer) StatFS() (unix.Statfs_t, error) {
	l.limitsMu.Lock()
	defer l.limitsMu.Unlock()
	var st unix.Statfs_t
	if err := unix.Fstatfs(l.rootFd, &st); err != nil {
		return st, Errno(err)
	}
	meta := metaUsed(&st)
	l.mu.Lock()
	o := l.opts
	l.mu.Unlock()
	chunk := metaChunk(o.Size)
	if l.reserved.Load()-meta >= 2*chunk {
		if l.remountLocked(o, roundUp(meta, chunk)) == nil {
			if err := unix.Fstatfs(l.rootFd, &st); err != nil {
				return st, Errno(err)
			}
		}
	}
	// The instance has Size - reserved blocks, and what is free of them
	// is what data may still take.
	st.Blocks += uint64(l.reserved.Load() / int64(st.Bsize))
	return st, nil
}

// Usage is what a volume's memory layer uses and may use. BytesUsed
// counts file data and the room kept for the charge of inodes and xattrs,
// which is MetaBytes rounded up to a step.
type Usage struct {
	BytesUsed, BytesLimit   uint64
	InodesUsed, InodesLimit uint64
	// MetaBytes is the charge for inodes and xattrs (see StatFS).
	MetaBytes uint64
}

// Usage reports the instance's usage. The numbers are those df shows.
func (l *Layer) Usage() (Usage, error) {
	st, err := l.StatFS()
	if err != nil {
		return Usage{}, err
	}
	bs := uint64(st.Bsize)
	return Usage{
		BytesUsed:   (st.Blocks - st.Bfree) * bs,
		BytesLimit:  st.Blocks * bs,
		InodesUsed:  st.Files - st.Ffree,
		InodesLimit: st.Files,
		MetaBytes:   uint64(metaUsed(&st)),
	}, nil
}

// MountedUsage measures an instance that no Layer serves, mounted on dir
// (one a previous process left), by statfs on its mount point. The room
// reserved for the metadata charge is not known without the Layer's
// Options; the charge itself is, and is counted as used and as part of
// the limit, so the figures are a lower bound of what the instance holds
// and the bytes used include inodes and xattrs as Usage's do.
func MountedUsage(dir string) (Usage, error) {
	var st unix.Statfs_t
	if err := unix.Statfs(dir, &st); err != nil {
		return Usage{}, Errno(err)
	}
	bs := uint64(st.Bsize)
	meta := uint64(metaUsed(&st))
	return Usage{
		BytesUsed:   (st.Blocks-st.Bfree)*bs + meta,
		BytesLimit:  st.Blocks*bs + meta,
		InodesUsed:  st.Files - st.Ffree,
		InodesLimit: st.Files,
		MetaBytes:   meta,
	}, nil
}
