// Package vfs is the contract between a csi-memfs file system and the
// server that serves it: the small interfaces a served tree satisfies
// (api.go) and the types they speak in. memfs (a Layer on its own) and
// overlay (an overlay of one over a lower tree) implement them directly;
// fusefs serves any FS over FUSE. The package holds no state and imports
// only the standard library and golang.org/x/sys/unix.
//
// # Inode numbers
//
// Inodes are named by a uint64 inode number, the file system's own, which
// fusefs uses as the FUSE node id unchanged (so a restarted server can
// re-derive it). The root is RootIno in every FS.
//
// # References
//
// Every call that returns an Entry (Lookup, Mkdir, Mknod, Symlink, Link,
// Create, Tmpfile) adds one reference to that inode, exactly as FUSE counts
// lookups; Forget drops references. Every File holds a reference until its
// Release and every Dir until its Close. An inode number may only be passed
// to a method while the caller holds a reference to it (RootIno always has
// one); given an inode number it holds no reference to, a method returns
// ESTALE. A server that took over a kernel connection from a predecessor
// relies on that: it finds such inodes again in the tree and retries.
//
// # Errors
//
// Every method returns nil or a bare syscall.Errno, so that callers can
// compare with errors.Is and hand the errno to the kernel unchanged. Each
// method's doc lists the errnos it gives beyond the kernel's usual ones for
// the same system call. A method that fails returns a nil interface (never
// a typed nil) for its File or Dir.
//
// # Permissions
//
// A file system runs as root and does not check permissions: the server
// above mounts with default_permissions, so the kernel has already checked
// the caller's access against the attributes the file system reports. It
// gives what it creates to the Caller and clears set-user-ID and
// set-group-ID bits where Linux would.
package vfs

import "golang.org/x/sys/unix"

// RootIno is the inode number of the root directory of every FS (tmpfs
// numbers its root 1, which is also FUSE's root node id).
const RootIno uint64 = 1

// Caller is the identity an operation acts for: the process that made the
// file system request.
type Caller struct {
	Uid, Gid uint32
	// Umask is the caller's umask. An operation that creates an inode
	// clears its bits from the new inode's mode, unless the parent
	// directory has a default POSIX ACL, which then takes its place (as
	// Linux's posix_acl_create does).
	Umask uint32
}

// Root is the Caller uid 0, gid 0: the caller of operations a file system,
// or its owner, does for itself.
var Root = Caller{}

// Entry describes an inode returned by a namespace operation.
type Entry struct {
	// Stat holds the inode's attributes; Stat.Ino is its inode number.
	Stat unix.Stat_t
	// Gen is the inode's generation. With the inode number it names the
	// inode uniquely for the life of the file system.
	Gen uint32
}

// Ino returns the inode number of e.
func (e *Entry) Ino() uint64 { return e.Stat.Ino }

// AttrMask says which fields of a SetAttr apply.
type AttrMask uint32

// The bits of AttrMask.
const (
	SetMode AttrMask = 1 << iota
	SetUid
	SetGid
	SetSize
	SetAtime
	SetMtime
	// KillSuidGid clears the set-user-ID bit, and the set-group-ID bit of a
	// group-executable file, with a size change: set it when the caller
	// lacks CAP_FSETID, as Linux does on truncate.
	KillSuidGid
)

// SetAttr is a change of attributes.
type SetAttr struct {
	Valid AttrMask
	// Mode holds the permission bits, including set-ID and sticky bits.
	Mode     uint32
	Uid, Gid uint32
	Size     int64
	// Atime and Mtime may carry unix.UTIME_NOW in Nsec.
	Atime, Mtime unix.Timespec
}

// OpenOptions refine Open, Create and Tmpfile.
type OpenOptions struct {
	// Direct asks for a File whose bytes the caller may move on Fd itself,
	// bypassing ReadAt and WriteAt (FUSE passthrough). The file system
	// grants it (File.Direct) unless it must see the bytes: for memfs, a
	// writable file that is grow-sealed, or set-ID (opened with
	// KillSuidGid false); for an overlay, also a file not wholly in one
	// layer.
	Direct bool
	// KillSuidGid says the opener lacks CAP_FSETID. Linux clears set-ID
	// bits on such a caller's first write or truncate; since a Direct
	// writer's bytes never pass through the file system, it clears them
	// when the file is opened for writing or with O_TRUNC.
	KillSuidGid bool
}

// Rename flags accepted by Rename (renameat2(2)'s).
const (
	RenameNoReplace = unix.RENAME_NOREPLACE
	RenameExchange  = unix.RENAME_EXCHANGE
)

// DirEntry is one entry of a directory.
type DirEntry struct {
	Ino uint64
	// Off is the offset of the next entry: pass it to ReadDir of the same
	// Dir to continue after this one.
	Off int64
	// Type is the entry's DT_* type.
	Type uint8
	Name string
}
