// Package fusefs serves a vfs.FS (a memfs Layer, or an overlay of one)
// over FUSE with go-fuse's raw protocol API. It is the only package of
// csi-memfs that speaks FUSE; it knows nothing of CSI, images or Kubernetes.
//
// # Data path
//
// File bytes do not pass through this process when they need not. An open
// is answered with FUSE passthrough (Linux >= 6.9, CAP_SYS_ADMIN): the
// kernel reads, writes and maps the backing tmpfs file itself, at tmpfs
// speed, and charges the pages to the writing pod's memory cgroup. The
// kernel allows one I/O mode per inode at a time: while an inode has
// passthrough opens, every open of it must share their one backing file
// (rawFS.backing). memfs withholds passthrough only from writers it must
// watch (a grow-sealed file); those are served with pread/pwrite here, as
// direct I/O, when no passthrough open of the inode exists, and get ETXTBSY
// when one does. Set-ID files need no watching: an unprivileged writer's
// open clears the bits. When the kernel refuses passthrough, the first
// refusal is logged, Passthrough turns false, and all I/O is served here
// with the page cache.
//
// Metadata is bound by round trips, so: entry, attribute and negative-entry
// timeouts of an hour (every change goes through this server; the one
// exception, stores into shared mappings of a passthrough file, is why an
// inode with read-write passthrough opens gets a timeout of zero:
// rawfs_writers.go), no FLUSH handler, READDIRPLUS in the kernel's
// automatic mode (no LOOKUP per entry listed), directories read without
// OPENDIR and RELEASEDIR (dirs.go) and cached by the kernel across opens,
// absent security.* look-ups answered EOPNOTSUPP (ls -l then stops
// asking), POSIX ACLs cached by the kernel (FUSE_POSIX_ACL), symlink
// caching,
// FUSE_HANDLE_KILLPRIV_V2 (memfs clears set-ID bits itself, sparing a
// GETXATTR per write), no writeback cache (it excludes passthrough). A
// read-only mount has a read-only superblock, on which reads do not make
// the kernel drop cached atimes; with Options.NoOpen its files are opened
// without OPEN and RELEASE and read into the FUSE page cache. Requests
// are counted by operation (counts.go); TestRequestCounts pins what walks
// of a tree cost.
//
// # Node ids
//
// FUSE node ids are the file system's inode numbers, unmapped; the root is
// 1 in both. A successor process serving the same kernel connection can
// therefore re-derive every node from the tree the kernel still holds, and
// any server can find the inode of a file handle the kernel has forgotten
// (FUSE_EXPORT_SUPPORT, rawfs_export.go). Every server serves its tree
// through the rederiving decorator (restart_rederive.go), so that its
// index of the tree knows every namespace change.
//
// # Serving
//
// Mount (mount.go) mounts a vfs.FS and returns its Server. A session
// (session.go, the serving loop) owns each connection's /dev/fuse
// descriptor and serves it with go-fuse's ProtocolServer, not fuse.Server,
// so that a connection can outlive the process serving it. Requests land
// on rawFS: node, attribute and xattr requests in rawfs.go, open files and
// directories (and passthrough backing files) in files.go, statx in
// rawfs_statx.go, the inode-flag ioctls in rawfs_ioctl.go. File handles
// are records of the open-handle table (handles.go), kept in a memory
// file so that they outlive the process too.
// A panic in a handler is recovered where the loop hands the request to
// go-fuse: the request is answered EIO, logged once with its operation,
// node id and stack, and counted (Server.Panics); serving goes on.
//
// Unmount never waits on a pod: a busy mount is detached, and if files
// are still open after Options.UnmountGrace the connection is aborted
// through fusectl (abort.go) and Server.Forced says so.
//
// Where the kernel and the container allow it (Options.Transport), the
// connection is served over io_uring too (uring_*.go, Linux >= 6.14): one
// queue per CPU, each a thread of its own answering a request and taking
// the next in one system call. INIT, FORGET and INTERRUPT stay on
// /dev/fuse, and so do the session's readers. Such a connection cannot
// change server, so TransportAuto uses it only for mounts that never
// will (Options.NoHandover) (docs/restart.md, "FUSE over io_uring").
//
// # Restarts
//
// The restart_*.go files hold what only a change of server process needs
// (docs/restart.md). Stop hands a Session (the descriptor, the open-handle
// table's memory file and the recorded INIT) to a successor, which Adopts
// it (restart.go) and reopens every open file from its record; after a
// crash a holder's copy of the Session is adopted with a resend of the
// requests the dead server never answered (restart_resend.go), and while
// no server runs the holder answers with Refuse (restart_refuse.go). Node
// ids a successor never looked up are found again in the tree
// (restart_rederive.go).
//
// # Permissions
//
// Mounts use default_permissions and allow_other: the kernel checks every
// access against the attributes and POSIX ACLs this server reports, for
// any uid, and the file system runs as root on the caller's behalf
// (vfs.Caller). With FUSE_POSIX_ACL the kernel leaves the umask to the
// server (FUSE_DONT_MASK): the caller's goes to the file system, which
// applies it only where no default ACL takes its place. Mounts are always
// nosuid and nodev.
//
// # Lock order
//
//	rawFS.backingMu (passthrough backing files)
//	  handleTable.mu (the open-handle table)
//	  the file system's locks, through methods of a vfs.File (Fd, Handle)
//	  rawFS.rdwrMu (inodes with read-write passthrough opens; a leaf)
//	rederiver.mu (one re-derivation at a time, across calls into the
//	file system)
//	  the file system's locks (a file system never calls back into fusefs)
//	session.endMu (why serving ended)
//	rawFS.dirsMu (directories kept open between READDIRs): nothing is
//	called with it held
//
// The io_uring transport takes no lock: a queue's ring, buffers and
// counters belong to its thread alone.
//
// rawFS.backingMu and rederiver.mu are never held together: no call into
// the file system is made with backingMu held but those on an open File,
// which the rederiver does not wrap.
package fusefs
