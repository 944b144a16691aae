// Package memfs is the writable memory layer of a csi-memfs volume.
//
// A Layer owns a private kernel tmpfs instance mounted on a directory the
// caller chooses (under the plugin's state directory; never visible to a
// pod). File bytes, metadata, holes, ENOSPC and usage all come from the
// kernel: memfs holds no file data in the Go heap. Because the tree lives in
// the kernel it can outlive the process that made it.
//
// A *Layer implements vfs.FS (and vfs.OrphanFinder) directly, so it can be
// served on its own or be the upper layer of an overlay; its Files
// implement vfs.File and vfs.HandleFile, its Dirs vfs.Dir. The types the
// methods speak in (Entry, Caller, SetAttr, OpenOptions, DirEntry) are
// vfs's.
//
// # Addressing
//
// Inodes are named by their tmpfs inode number (Ino). The root is
// vfs.RootIno. memfs never resolves a path: every inode it knows is reopened
// from a kernel file handle (open_by_handle_at), and every name an operation
// takes is a single component checked by CheckName and used with an *at
// call that does not follow symlinks. A pod that plants a symlink, a ".." entry or
// renames directories under an operation cannot steer memfs outside the
// instance.
//
// # References
//
// Every call that returns a vfs.Entry (Lookup, Create, Tmpfile, Mkdir,
// Mknod, Symlink, Link, LookupHandle) adds one reference to that inode,
// exactly as FUSE counts lookups; the caller drops references with Forget.
// An Ino may only be passed to a method while the caller holds a reference
// to it (vfs.RootIno always has one); otherwise the method returns ESTALE.
//
// # Users, permissions and internal state
//
// memfs runs as root and does not check permissions: the FUSE layer above
// mounts with default_permissions, so the kernel has already checked the
// caller's access against the attributes memfs reports. memfs gives what it
// creates to the vfs.Caller and clears set-user-ID and set-group-ID bits where
// Linux would (write, truncate, chown by a caller). It sets the process
// umask to 0 (New) and applies the caller's umask itself (vfs.Caller), so
// that the instance's own POSIX ACL support works as on Linux: ACLs are
// stored as the instance's system.posix_acl_* attributes, a new inode
// inherits its directory's default ACL, and chmod updates an ACL's mask.
//
// Block and character device nodes can be made (Mknod), renamed, linked
// and removed like other files, and report their device number, but they
// are inert: the instance is mounted nodev, and memfs opens only regular
// files and directories.
//
// memfs keeps its own markers (seals, and the overlay's whiteouts, opaque
// directories and copy-up records) as "trusted.memfs.*" extended attributes.
// They are invisible to GetXattr and ListXattr and refused by SetXattr and
// RemoveXattr; GetMarker, SetMarker, RemoveMarker and GetMarkerAt give
// layers built on memfs access to them.
//
// # Errors
//
// Every method returns nil or a bare syscall.Errno, so callers can compare
// with errors.Is and hand the errno to the kernel unchanged.
//
// # Limits
//
// The instance's size and inode limits are the kernel's, but tmpfs lets
// inodes and xattrs use memory outside size; memfs charges them to size
// itself (usage.go), so that a volume's data, inodes and xattrs together
// stay within Options.Size and StatFS and Usage show all three.
//
// # Lock order
//
//	Layer.limitsMu (the instance's limits: remounts)
//	  Layer.mu (the inode table)
//	    inode.mu (seals, open-writer counts, the xattrs an inode remembers)
//
// No kernel call is made while Layer.mu is held except closing an evicted
// descriptor.
package memfs

import (
	"sync"
	"sync/atomic"
	"syscall"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Options configure a Layer's tmpfs instance.
type Options struct {
	// Size is the byte limit of the instance (tmpfs size=). It must be
	// positive; tmpfs rounds it up to whole pages.
	Size int64
	// Inodes is the inode limit (tmpfs nr_inodes=). Zero means one inode per
	// 4 KiB page of Size, with a floor of 1024.
	Inodes uint64
	// NoSwap keeps the instance's pages out of swap (tmpfs noswap, Linux
	// 6.4 and later; older kernels refuse the mount with EINVAL).
	NoSwap bool
	// Fds bounds the O_PATH descriptors kept open for referenced inodes
	// (each spares a handle lookup per operation). Share one FdBudget
	// between all the Layers of a process, so that many volumes stay within
	// its open-file limit; past the budget, operations open descriptors as
	// they need them. Nil means a budget of 1024 for this Layer alone.
	Fds *FdBudget
}

// FdBudget is a number of descriptors that Layers sharing it may keep
// cached between them. It is safe for concurrent use.
type FdBudget struct {
	// limit is immutable; used is accessed atomically.
	// Invariant: 0 <= used <= limit.
	limit int64
	used  atomic.Int64
}

// NewFdBudget returns a budget of n descriptors.
func NewFdBudget(n int) *FdBudget { return &FdBudget{limit: int64(n)} }

// InUse returns the descriptors held against the budget.
func (b *FdBudget) InUse() int64 { return b.used.Load() }

func (b *FdBudget) take() bool {
	if b.used.Add(1) > b.limit {
		b.used.Add(-1)
		return false
	}
	return true
}

func (b *FdBudget) give() { b.used.Add(-1) }

func (o Options) withDefaults() Options {
	if o.Inodes == 0 {
		o.Inodes = max(uint64(o.Size)/4096, 1024)
	}
	if o.Fds == nil {
		o.Fds = NewFdBudget(1024)
	}
	return o
}

// Layer is one volume's memory layer: a tmpfs instance and the table of
// inodes its users hold references to.
type Layer struct {
	// dir is the mountpoint of the instance. Immutable.
	dir string
	// rootFd is an O_RDONLY descriptor of the instance's root directory; it
	// is the mount descriptor for open_by_handle_at. Immutable until Close.
	rootFd int
	// opts are the limits the instance was last mounted or resized with.
	// Protected by mu; changed with limitsMu held too.
	opts Options
	// limitsMu serializes changes of the instance's limits (remounts).
	limitsMu sync.Mutex
	// reserved is the part of opts.Size kept from file data for the
	// charge of inodes and xattrs: the instance is mounted with size =
	// opts.Size - reserved (see usage.go). Changed with limitsMu held;
	// accessed atomically.
	reserved atomic.Int64
	// metaRoom is how much of reserved is known to be free for the
	// charge of inodes and xattrs without asking statfs (see reserveMeta);
	// negative or zero means ask. Set with limitsMu held, by the statfs
	// that learns it and by every remount (to zero); lowered by every
	// charge. Accessed atomically.
	metaRoom atomic.Int64

	// handleType is the type of the instance's file handles, and dev its
	// device number. Set once by initRoot.
	handleType int32
	dev        uint64
	// mu protects the inode table and the descriptor cache count.
	mu sync.Mutex
	// inodes maps Ino to the inodes callers hold references to.
	// Invariant: every inode in the table has refs > 0, except the root,
	// which is always present.
	inodes map[uint64]*inode
	// cachedFds counts inodes whose pathFd is open, each held against
	// opts.Fds.
	// Invariant: cachedFds == number of inodes with pathFd >= 0.
	cachedFds int

	// sealViolations counts operations refused because of a seal.
	sealViolations atomic.Uint64
}

// A Layer is served directly: no adapter stands between it and the server.
var (
	_ vfs.FS           = (*Layer)(nil)
	_ vfs.OrphanFinder = (*Layer)(nil)
	_ vfs.Holder       = (*Layer)(nil)
	_ vfs.File         = (*File)(nil)
	_ vfs.HandleFile   = (*File)(nil)
	_ vfs.Dir          = (*Dir)(nil)
)

// SealViolations returns how many operations the seals have refused.
func (l *Layer) SealViolations() uint64 { return l.sealViolations.Load() }

// sealDenied counts a seal violation and returns its error, EPERM.
func (l *Layer) sealDenied() error {
	l.sealViolations.Add(1)
	return syscall.EPERM
}

// Dir returns the directory the instance is mounted on.
func (l *Layer) Dir() string { return l.dir }

// Errno converts an error from the unix package or the standard library to
// a bare syscall.Errno, the error convention of memfs and of the layers
// built on it. Errors that carry no errno become EIO.
func Errno(err error) error {
	if err == nil {
		return nil
	}
	if e, ok := err.(syscall.Errno); ok {
		if e == 0 {
			return nil
		}
		return e
	}
	if u, ok := err.(interface{ Unwrap() error }); ok {
		return Errno(u.Unwrap())
	}
	return syscall.EIO
}
