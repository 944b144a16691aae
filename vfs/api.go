package vfs

import "golang.org/x/sys/unix"

// The interfaces below are what fusefs serves. FS composes the five a
// served tree must have; OrphanFinder, HandleFile, BirthTimer, InodeFlags,
// Exporter and Holder are optional, and their docs say what the server
// does without them. Each method returns nil or a bare syscall.Errno (see the package
// doc); the errnos listed are those the contract gives meaning to, beyond
// the kernel's usual ones for the same system call (ENOSPC, EIO, ...).

// FS is a file system fusefs can serve: memfs's *Layer or overlay's *FS.
type FS interface {
	Namespace
	Attributes
	Xattrs
	Opener
	StatFSer
}

// Namespace finds, makes and removes names. Each Entry it returns holds a
// reference to its inode (see References in the package doc).
type Namespace interface {
	// Lookup finds name in the directory parent and adds a reference to
	// it. It never follows a symlink: a symlink is returned as itself.
	//
	// Errors: ENOENT, ENOTDIR (parent is not a directory), EINVAL (name
	// is not one component), ENAMETOOLONG.
	Lookup(parent uint64, name string) (Entry, error)
	// Forget drops n references to ino. When none are left the inode
	// leaves the file system's table (its data is freed once it has no
	// name either). Forgetting RootIno, or an inode with no references,
	// does nothing. A Forget that drops the last reference must not run
	// concurrently with another call on ino.
	Forget(ino, n uint64)
	// Readlink returns the target of the symlink ino.
	//
	// Errors: EINVAL (ino is not a symlink).
	Readlink(ino uint64) (string, error)

	// Mkdir creates the directory name in parent, owned by c, with mode's
	// permission bits (the set-group-ID bit is inherited from parent as
	// on Linux).
	//
	// Errors: EEXIST, ENOENT (parent was removed), ENOTDIR, ENOSPC,
	// EINVAL, ENAMETOOLONG, EPERM (a name the file system keeps for
	// itself).
	Mkdir(parent uint64, name string, mode uint32, c Caller) (Entry, error)
	// Mknod creates a regular file, FIFO, socket, or block or character
	// device with the device number rdev (as unix.Mkdev makes it; ignored
	// for the other types). A device node is inert: it is never opened.
	//
	// Errors: as Mkdir, EPERM for a directory, and EINVAL for other types
	// and for an rdev beyond the kernel's 32-bit device numbers.
	Mknod(parent uint64, name string, mode uint32, rdev uint64, c Caller) (Entry, error)
	// Symlink creates the symlink name in parent pointing at target, which
	// is stored as given and never followed.
	//
	// Errors: as Mkdir, and ENOENT for an empty target.
	Symlink(parent uint64, name, target string, c Caller) (Entry, error)
	// Link makes name in newParent a new link to ino and returns ino with
	// one more reference.
	//
	// Errors: EPERM (ino is a directory), EEXIST, ENOENT (ino was
	// removed), EMLINK, ENOSPC, EINVAL.
	Link(ino, newParent uint64, name string) (Entry, error)
	// Unlink removes the non-directory name from parent.
	//
	// Errors: ENOENT, EISDIR, ENOTDIR, EINVAL.
	Unlink(parent uint64, name string) error
	// Rmdir removes the empty directory name from parent.
	//
	// Errors: ENOENT, ENOTDIR, ENOTEMPTY, EINVAL.
	Rmdir(parent uint64, name string) error
	// Rename moves name in parent to newName in newParent, as renameat2(2)
	// with flags (0, RenameNoReplace or RenameExchange). It never returns
	// EXDEV.
	//
	// Errors: ENOENT, EEXIST, ENOTEMPTY, EISDIR, ENOTDIR, EINVAL (moving a
	// directory into itself, or other flags).
	Rename(parent uint64, name string, newParent uint64, newName string, flags uint32) error
}

// Attributes reads and changes an inode's attributes.
type Attributes interface {
	// GetAttr returns the attributes of ino.
	GetAttr(ino uint64) (unix.Stat_t, error)
	// SetAttr changes the attributes of ino as a.Valid says, in the order
	// size, owner, mode, times, and returns the attributes after the
	// change. f is an open File of ino or nil; a size change uses it if it
	// is writable (a File of another file system, or of another inode, is
	// ignored). A change of owner clears set-ID bits as chown(2) does; a
	// SetAttr that changes nothing is chown(2) with owner and group -1, as
	// FUSE sends it.
	//
	// Errors: EPERM (seals), EISDIR or EINVAL (size of a non-regular
	// file), EFBIG, ENOSPC.
	SetAttr(ino uint64, f File, a SetAttr) (unix.Stat_t, error)
}

// Xattrs are the extended attributes a caller may see and change. Names
// the file system keeps for itself are invisible and refused.
type Xattrs interface {
	// GetXattr reads the attribute name of ino into dest and returns its
	// size; with an empty dest it returns only the size.
	//
	// Errors: ENODATA (absent, or an internal name), ERANGE (dest too
	// small).
	GetXattr(ino uint64, name string, dest []byte) (int, error)
	// ListXattr writes the NUL-terminated names of ino's attributes into
	// dest and returns their size; with an empty dest it returns only the
	// size.
	//
	// Errors: ERANGE (dest too small).
	ListXattr(ino uint64, dest []byte) (int, error)
	// SetXattr sets the attribute name of ino, with setxattr(2) flags.
	//
	// Setting the POSIX ACL system.posix_acl_access also sets the mode's
	// permission bits, as Linux does.
	//
	// Errors: EPERM (an internal name), EEXIST or ENODATA (flags), ENOSPC,
	// E2BIG, EINVAL (a malformed ACL), and the seals' errors for the seals
	// attribute.
	SetXattr(ino uint64, name string, value []byte, flags int) error
	// RemoveXattr removes the attribute name of ino.
	//
	// Errors: ENODATA, EPERM (an internal name, or the seals attribute).
	RemoveXattr(ino uint64, name string) error
}

// Opener opens files and directories. Each File and Dir holds a reference
// to its inode until Release or Close; on error the File or Dir returned
// is a nil interface.
type Opener interface {
	// Open opens the regular file ino with the access mode and O_TRUNC of
	// flags; the other flags are the caller's business.
	//
	// Errors: EISDIR, EINVAL (not a regular file), EPERM (write access to
	// a write-sealed file; O_TRUNC of a shrink-sealed one), ENOENT.
	Open(ino uint64, flags int, o OpenOptions) (File, error)
	// Create creates the regular file name in parent for c with mode's
	// permission bits and opens it with flags. With O_EXCL an existing
	// name is EEXIST; without, an existing regular file is opened instead.
	// The Entry and the File each hold a reference.
	//
	// Errors: as Mkdir and Open.
	Create(parent uint64, name string, flags int, mode uint32, c Caller, o OpenOptions) (Entry, File, error)
	// Tmpfile creates an unnamed regular file in the directory parent for
	// c, open with flags (O_TMPFILE); Link can give it a name later. The
	// Entry and the File each hold a reference.
	//
	// Errors: ENOTDIR, ENOSPC, EINVAL (read-only flags).
	Tmpfile(parent uint64, flags int, mode uint32, c Caller, o OpenOptions) (Entry, File, error)
	// OpenDir opens the directory ino for reading.
	//
	// Errors: ENOTDIR.
	OpenDir(ino uint64) (Dir, error)
}

// StatFSer reports the file system's usage.
type StatFSer interface {
	// StatFS reports the block and inode limits and what is free, as df
	// shows them.
	StatFS() (unix.Statfs_t, error)
}

// File is an open regular file.
type File interface {
	// Fd returns a descriptor of the file's bytes in the kernel (of its
	// top layer), or -1 if there is none.
	Fd() int
	// Direct says whether the caller may read, and if the File is
	// writable write, on Fd directly (FUSE passthrough): see
	// OpenOptions.Direct.
	Direct() bool
	// ReadAt reads from the file at off; a short count means end of file.
	// Holes read as zeros.
	ReadAt(p []byte, off int64) (int, error)
	// WriteAt writes p at off, obeying the seals: EPERM on a write-sealed
	// file; on a grow-sealed file a write past the end of file is cut
	// back to the start of the page holding the end of file (EPERM if
	// nothing is left). With kill, set-ID bits are cleared first, as for
	// a writer without CAP_FSETID. When the file system is full the write
	// is short, then ENOSPC, and nothing written is lost.
	WriteAt(p []byte, off int64, kill bool) (int, error)
	// Allocate is fallocate(2) on the file. Punching a hole in a
	// write-sealed file, or growing a grow-sealed one, is EPERM.
	Allocate(mode uint32, off, length int64) error
	// Seek is lseek(2) for SEEK_DATA and SEEK_HOLE (and the plain
	// whences): it returns the resulting offset and moves no position
	// the File uses.
	Seek(off int64, whence int) (int64, error)
	// Sync is fsync(2), or fdatasync(2) with dataOnly.
	Sync(dataOnly bool) error
	// Stat returns the attributes of the open file, even once unlinked.
	Stat() (unix.Stat_t, error)
	// Release closes the File and drops its reference.
	Release()
}

// Dir is an open directory. A Dir is not safe for concurrent use.
type Dir interface {
	// ReadDir calls fn with the entries from offset off on ("." and ".."
	// included) until fn returns false or the directory ends.
	ReadDir(off int64, fn func(*DirEntry) bool) error
	// Sync is fsync(2) of the directory.
	Sync() error
	// Close drops the Dir's reference.
	Close() error
}

// OrphanFinder is implemented by an FS that can find an inode with no name
// (a file removed while open, or an O_TMPFILE) by the kernel inode holding
// its data, as a File's HandleFile names it. A successor server reopens
// the files its predecessor had open from their handle records: when Open
// of such a file is ESTALE it asks FindOrphan for it, then opens it again.
// Without OrphanFinder those handles stay dead (their requests fail with
// EIO) until the kernel releases them.
type OrphanFinder interface {
	// FindOrphan adds one reference to inode ino, whose data is the kernel
	// inode dataIno of generation gen.
	//
	// Errors: ESTALE (that inode is gone, or is not ino's).
	FindOrphan(ino, dataIno uint64, gen uint32) error
}

// HandleFile is implemented by a File that can name the kernel inode
// holding its data. The server records the name with each open handle, so
// that a successor can find the file by it (OrphanFinder) once it has no
// name. Without HandleFile, a nameless file's handles cannot be reopened
// by a successor.
type HandleFile interface {
	// Handle returns the inode number and generation of the kernel inode
	// holding the File's data; ok is false when there is none yet (a file
	// still wholly in a lower layer).
	Handle() (ino uint64, gen uint32, ok bool)
}

// BirthTimer is implemented by an FS that knows when its inodes were
// created. The server answers statx(2)'s STATX_BTIME from it; without it a
// mount reports no birth time.
type BirthTimer interface {
	// BirthTime returns when ino was created; ok is false when the file
	// system does not know (an overlay file still wholly in its lower
	// layer).
	BirthTime(ino uint64) (btime unix.Timespec, ok bool, err error)
}

// InodeFlags is implemented by an FS that keeps inode flags, the
// attributes chattr(1) sets (FS_IOC_GETFLAGS and FS_IOC_SETFLAGS). The
// file system enforces the immutable and append-only flags in every
// operation. Without InodeFlags those ioctls fail with ENOTTY.
type InodeFlags interface {
	// GetFlags returns the FS_*_FL flags of ino.
	//
	// Errors: ENOTTY (neither a regular file nor a directory).
	GetFlags(ino uint64) (uint32, error)
	// SetFlags sets the FS_*_FL flags of ino. The caller has checked the
	// privileges Linux asks for (ownership; CAP_LINUX_IMMUTABLE to change
	// the immutable or append-only flag).
	//
	// Errors: EOPNOTSUPP (a flag the file system does not keep), ENOTTY.
	SetFlags(ino uint64, flags uint32) error
}

// Exporter is implemented by an FS that can take an inode by its number
// alone and name a directory's parent: what the server needs to resolve a
// file handle (name_to_handle_at(2) and open_by_handle_at(2), an NFS
// export) once the kernel has forgotten the inode (FUSE_EXPORT_SUPPORT).
// The server finds an inode that the file system holds no reference to in
// the tree first, by its number, so that LookupInode finds it. Without
// Exporter, such handles are ESTALE.
type Exporter interface {
	// LookupInode adds one reference to ino and returns its Entry. Unlike
	// every other method, it may be called for an inode the caller holds
	// no reference to; the file system must hold one (the caller's
	// forgotten lookups aside: an open File's, say).
	//
	// Errors: ESTALE (the file system holds no reference to ino, or the
	// inode is gone).
	LookupInode(ino uint64) (Entry, error)
	// LookupParent returns the directory holding the directory ino, with
	// one reference added; the root's parent is the root.
	//
	// Errors: ENOTDIR (ino is not a directory), ESTALE (ino has been
	// removed).
	LookupParent(ino uint64) (Entry, error)
}

// Holder is implemented by an FS that can say whether an inode is held.
// The server answers READDIRPLUS with the name alone (no Lookup, no
// attributes) for an entry whose inode the kernel already holds; the
// kernel takes such an answer as "no information" and changes nothing.
// Without Holder, every entry of a READDIRPLUS is looked up.
type Holder interface {
	// Held reports whether ino has references the caller has not given
	// back: an Entry's not yet dropped by Forget, or an open File's or
	// Dir's. Held adds no reference and, unlike other methods, may be
	// called for any inode number: one the file system does not know is
	// not held.
	//
	// The answer is a hint, out of date as soon as it is returned: a
	// concurrent Forget, Lookup, open or close changes it. A caller must
	// stay correct whichever way it errs.
	Held(ino uint64) bool
}
