package fusefs

import (
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// cacheTimeout is how long the kernel may trust entries and attributes,
// negative entries included. Every change to a volume goes through this
// server, which answers it with fresh attributes, so the kernel's cache is
// never stale for long reasons; the timeout only bounds the damage of a bug.
const cacheTimeout = time.Hour

// rawFS implements fuse.RawFileSystem over a vfs.FS. Node ids are the
// file system's inode numbers: nothing maps them, so a successor process can
// serve the same kernel connection from the same tree.
type rawFS struct {
	fuse.RawFileSystem // ENOSYS for what is not implemented below
	// fs is the tree served, wrapped by rederiving (node ids a
	// successor never looked up, file handles of forgotten inodes).
	// Immutable.
	fs vfs.FS
	// opts are the server's options. Immutable.
	opts Options
	// dev is the session serving the connection: passthrough backing
	// files are registered on its descriptor. Set once, before any
	// request.
	dev *session
	// acls says the kernel checks access with POSIX ACLs
	// (FUSE_POSIX_ACL). A connection mounted without (by an older
	// server) refuses them: they would be stored and not enforced. Set
	// once, before any request.
	acls bool
	// setxattrExt says SETXATTR requests carry flags of their own
	// (FUSE_SETXATTR_EXT): the kernel tells which ACL changes clear the
	// set-group-ID bit. A connection mounted without (by an older
	// server) sends the shorter request, whose flags this server must not
	// read. Set once, before any request.
	setxattrExt bool

	// handles are the open files and directories, by FUSE handle.
	// Immutable.
	handles *handleTable

	// backingMu protects backing and passthrough.
	backingMu sync.Mutex
	// backing maps an inode to its registered passthrough backing file.
	// The kernel allows one backing file per inode; every passthrough open
	// of the inode shares it. A registration outlives the inode's last
	// open (idle: refs == 0) until the kernel forgets the inode (FORGET),
	// another file must back the inode (a copy-up), or recordedBacking
	// reaches maxRecordedBacking: opens of a file the kernel holds cost
	// one BACKING_OPEN in all, not one each and a BACKING_CLOSE at each
	// last release. The kernel opens a backing file of its own for each
	// open, with that open's flags, so the registered file's mode does not
	// matter. A registration has a recBacking record in the handle table
	// (recFh) from its first idle moment until it is closed, so that a
	// successor, even after a crash, takes it over and closes it.
	// Invariant: every entry has refs > 0 or recFh != 0.
	backing map[uint64]*backingFile
	// recordedBacking counts the entries of backing with recFh != 0.
	recordedBacking int
	// passthrough says passthrough may be used: the kernel offered it,
	// the options allow it, and no registration has failed.
	passthrough bool

	// rdwrMu serializes changes of rdwr.
	rdwrMu sync.Mutex
	// rdwr counts the read-write passthrough opens of each inode that
	// has some (rawfs_writers.go). The map is replaced, never changed in
	// place, under rdwrMu, so that replies read it without a lock.
	rdwr atomic.Pointer[map[uint64]int]
	// onRing is set once requests come over io_uring (acceptRing).
	onRing atomic.Bool
	// stale are the inodes whose attributes the kernel holds stale
	// (rawfs_stale.go).
	stale staleAttrs
	// dirsMu protects dirs.
	dirsMu sync.Mutex
	// dirs are directories kept open between READDIRs without a handle
	// (dirs.go), by inode. Invariant: len(dirs) <= maxDirStreams.
	dirs map[uint64]*dirStream
}

// backingFile is an inode's registered passthrough backing file. Its
// fields are protected by rawFS.backingMu.
type backingFile struct {
	// id is the kernel's backing id.
	id int32
	// refs counts the passthrough opens that use it.
	refs int
	// file is the backing file's identity.
	file fileID
	// recFh is the fh of its recBacking record, or 0.
	recFh uint64
}

// fileID names a file by device and inode number.
type fileID struct{ dev, ino uint64 }

// fileKnower is a vfs.File that knows the device and inode numbers of
// the file its Fd is open on (a memfs.File): passthrough spares a stat
// per open then.
type fileKnower interface {
	FileID() (dev, ino uint64)
}

func newRawFS(fs vfs.FS, opts Options, handles *handleTable) *rawFS {
	return &rawFS{
		RawFileSystem: fuse.NewDefaultRawFileSystem(),
		fs:            fs,
		opts:          opts,
		handles:       handles,
		backing:       map[uint64]*backingFile{},
		dirs:          map[uint64]*dirStream{},
	}
}

func (r *rawFS) String() string { return "csi-memfs" }

// negotiated takes the capabilities INIT settled on.
func (r *rawFS) negotiated(flags uint64) {
	r.backingMu.Lock()
	defer r.backingMu.Unlock()
	r.passthrough = !r.opts.DisablePassthrough && flags&fuse.CAP_PASSTHROUGH != 0
	r.acls = flags&fuse.CAP_POSIX_ACL != 0
	r.setxattrExt = flags&fuse.CAP_SETXATTR_EXT != 0
}

// status converts an error from the file system to a FUSE status. Anything
// but an errno is a bug: it becomes EIO and one log line.
func status(op string, err error) fuse.Status {
	if err == nil {
		return fuse.OK
	}
	if e, ok := err.(syscall.Errno); ok {
		return fuse.Status(e)
	}
	klog.ErrorS(err, "Unexpected error from file system", "op", op)
	return fuse.EIO
}

// observe reports a finished request to the Observer.
func (r *rawFS) observe(op string, start time.Time, st fuse.Status) {
	if r.opts.Observer != nil {
		r.opts.Observer.ObserveOp(op, time.Since(start), syscall.Errno(st))
	}
}

// now returns the start time of a request, if anyone observes it.
func (r *rawFS) now() time.Time {
	if r.opts.Observer == nil {
		return time.Time{}
	}
	return time.Now()
}

// caller returns the Caller of a request; umask is the caller's, for
// requests that create an inode (the kernel leaves applying it to us:
// FUSE_DONT_MASK).
func caller(h *fuse.InHeader, umask uint32) vfs.Caller {
	return vfs.Caller{Uid: h.Uid, Gid: h.Gid, Umask: umask}
}

func fillAttr(a *fuse.Attr, st *unix.Stat_t) {
	a.Ino = st.Ino
	a.Size = uint64(st.Size)
	a.Blocks = uint64(st.Blocks)
	a.Atime, a.Atimensec = uint64(st.Atim.Sec), uint32(st.Atim.Nsec)
	a.Mtime, a.Mtimensec = uint64(st.Mtim.Sec), uint32(st.Mtim.Nsec)
	a.Ctime, a.Ctimensec = uint64(st.Ctim.Sec), uint32(st.Ctim.Nsec)
	a.Mode = st.Mode
	a.Nlink = uint32(st.Nlink)
	a.Uid, a.Gid = st.Uid, st.Gid
	a.Rdev = uint32(st.Rdev)
	a.Blksize = uint32(st.Blksize)
}

// fillEntry fills an entry reply, its attribute timeout that of the
// inode (attrTimeout: none cached while it has read-write passthrough
// opens).
func (r *rawFS) fillEntry(out *fuse.EntryOut, e *vfs.Entry) {
	out.NodeId = e.Ino()
	out.Generation = uint64(e.Gen)
	out.SetEntryTimeout(cacheTimeout)
	out.SetAttrTimeout(r.attrTimeout(e.Ino()))
	fillAttr(&out.Attr, &e.Stat)
	if out.AttrValid != 0 {
		r.stale.fresh(e.Ino())
	}
}

// fillAttrOut fills an attribute reply of ino, as fillEntry.
func (r *rawFS) fillAttrOut(out *fuse.AttrOut, ino uint64, st *unix.Stat_t) {
	out.SetTimeout(r.attrTimeout(ino))
	fillAttr(&out.Attr, st)
	if out.AttrValid != 0 {
		r.stale.fresh(ino)
	}
}

// entry finishes a request that made or found an entry.
func (r *rawFS) entry(op string, start time.Time, out *fuse.EntryOut, e vfs.Entry, err error) fuse.Status {
	st := status(op, err)
	if st == fuse.OK {
		r.fillEntry(out, &e)
	}
	r.observe(op, start, st)
	return st
}

func (r *rawFS) Lookup(_ <-chan struct{}, h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	if name == "." || name == ".." {
		return r.lookupDots(h, name, out)
	}
	start := r.now()
	e, err := r.fs.Lookup(h.NodeId, name)
	if err == syscall.ENOENT {
		// A negative entry: the kernel caches the absence of name.
		out.NodeId = 0
		out.SetEntryTimeout(cacheTimeout)
		r.observe("LOOKUP", start, fuse.OK)
		return fuse.OK
	}
	return r.entry("LOOKUP", start, out, e, err)
}

func (r *rawFS) Forget(nodeid, nlookup uint64) {
	r.fs.Forget(nodeid, nlookup)
	r.forgetBacking(nodeid)
}

// getAttr returns the attributes of ino, through the open file fh when
// flags say the request names one (FUSE_GETATTR_FH); the handle table is
// looked up only then.
func (r *rawFS) getAttr(ino uint64, flags uint32, fh uint64) (unix.Stat_t, error) {
	if flags&fuse.FUSE_GETATTR_FH != 0 {
		if f, ok := r.file(fh); ok == fuse.OK {
			return f.Stat()
		}
	}
	return r.fs.GetAttr(ino)
}

func (r *rawFS) GetAttr(_ <-chan struct{}, in *fuse.GetAttrIn, out *fuse.AttrOut) fuse.Status {
	start := r.now()
	st, err := r.getAttr(in.NodeId, in.Flags(), in.Fh())
	s := status("GETATTR", err)
	if s == fuse.OK {
		r.fillAttrOut(out, in.NodeId, &st)
	}
	r.observe("GETATTR", start, s)
	return s
}

func (r *rawFS) SetAttr(_ <-chan struct{}, in *fuse.SetAttrIn, out *fuse.AttrOut) fuse.Status {
	start := r.now()
	var a vfs.SetAttr
	if in.Valid&fuse.FATTR_MODE != 0 {
		a.Valid |= vfs.SetMode
		a.Mode = in.Mode
	}
	if in.Valid&fuse.FATTR_UID != 0 {
		a.Valid |= vfs.SetUid
		a.Uid = in.Uid
	}
	if in.Valid&fuse.FATTR_GID != 0 {
		a.Valid |= vfs.SetGid
		a.Gid = in.Gid
	}
	if in.Valid&fuse.FATTR_SIZE != 0 {
		a.Valid |= vfs.SetSize
		a.Size = int64(in.Size)
	}
	if in.Valid&fuse.FATTR_KILL_SUIDGID != 0 {
		a.Valid |= vfs.KillSuidGid
	}
	if in.Valid&fuse.FATTR_ATIME != 0 {
		a.Valid |= vfs.SetAtime
		a.Atime = unix.Timespec{Sec: int64(in.Atime), Nsec: int64(in.Atimensec)}
		if in.Valid&fuse.FATTR_ATIME_NOW != 0 {
			a.Atime.Nsec = unix.UTIME_NOW
		}
	}
	if in.Valid&fuse.FATTR_MTIME != 0 {
		a.Valid |= vfs.SetMtime
		a.Mtime = unix.Timespec{Sec: int64(in.Mtime), Nsec: int64(in.Mtimensec)}
		if in.Valid&fuse.FATTR_MTIME_NOW != 0 {
			a.Mtime.Nsec = unix.UTIME_NOW
		}
	}
	var f vfs.File
	if in.Valid&fuse.FATTR_FH != 0 {
		f, _ = r.file(in.Fh)
	}
	st, err := r.fs.SetAttr(in.NodeId, f, a)
	s := status("SETATTR", err)
	if s == fuse.OK {
		r.fillAttrOut(out, in.NodeId, &st)
	}
	r.observe("SETATTR", start, s)
	return s
}

func (r *rawFS) Mknod(_ <-chan struct{}, in *fuse.MknodIn, name string, out *fuse.EntryOut) fuse.Status {
	start := r.now()
	e, err := r.fs.Mknod(in.NodeId, name, in.Mode, uint64(in.Rdev), caller(&in.InHeader, in.Umask))
	if m, ok := r.made(&in.InHeader, err, in.NodeId, name); ok {
		e, err = m, nil
	}
	r.changed(err, in.NodeId)
	return r.entry("MKNOD", start, out, e, err)
}

func (r *rawFS) Mkdir(_ <-chan struct{}, in *fuse.MkdirIn, name string, out *fuse.EntryOut) fuse.Status {
	start := r.now()
	e, err := r.fs.Mkdir(in.NodeId, name, in.Mode, caller(&in.InHeader, in.Umask))
	if m, ok := r.made(&in.InHeader, err, in.NodeId, name); ok {
		e, err = m, nil
	}
	r.changed(err, in.NodeId)
	return r.entry("MKDIR", start, out, e, err)
}

func (r *rawFS) Symlink(_ <-chan struct{}, h *fuse.InHeader, target, name string, out *fuse.EntryOut) fuse.Status {
	start := r.now()
	e, err := r.fs.Symlink(h.NodeId, name, target, caller(h, 0))
	if m, ok := r.made(h, err, h.NodeId, name); ok {
		e, err = m, nil
	}
	r.changed(err, h.NodeId)
	return r.entry("SYMLINK", start, out, e, err)
}

func (r *rawFS) Link(_ <-chan struct{}, in *fuse.LinkIn, name string, out *fuse.EntryOut) fuse.Status {
	start := r.now()
	e, err := r.fs.Link(in.Oldnodeid, in.NodeId, name)
	if m, ok := r.made(&in.InHeader, err, in.NodeId, name); ok {
		e, err = m, nil
	}
	r.changed(err, in.NodeId, in.Oldnodeid)
	return r.entry("LINK", start, out, e, err)
}

func (r *rawFS) Unlink(_ <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	start := r.now()
	err := r.fs.Unlink(h.NodeId, name)
	if gone(h, err) {
		err = nil
	}
	r.changed(err, h.NodeId)
	s := status("UNLINK", err)
	r.observe("UNLINK", start, s)
	return s
}

func (r *rawFS) Rmdir(_ <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	start := r.now()
	err := r.fs.Rmdir(h.NodeId, name)
	if gone(h, err) {
		err = nil
	}
	r.changed(err, h.NodeId)
	s := status("RMDIR", err)
	r.observe("RMDIR", start, s)
	return s
}

func (r *rawFS) Rename(_ <-chan struct{}, in *fuse.RenameIn, name, newName string) fuse.Status {
	start := r.now()
	err := r.fs.Rename(in.NodeId, name, in.Newdir, newName, in.Flags)
	if gone(&in.InHeader, err) {
		if e, lerr := r.fs.Lookup(in.Newdir, newName); lerr == nil {
			r.fs.Forget(e.Ino(), 1)
			err = nil
		}
	}
	r.changed(err, in.NodeId, in.Newdir)
	s := status("RENAME", err)
	r.observe("RENAME", start, s)
	return s
}

func (r *rawFS) Readlink(_ <-chan struct{}, h *fuse.InHeader) ([]byte, fuse.Status) {
	start := r.now()
	target, err := r.fs.Readlink(h.NodeId)
	s := status("READLINK", err)
	r.observe("READLINK", start, s)
	return []byte(target), s
}

// GetXAttr reads an extended attribute. A security.* name the file does
// not have is answered EOPNOTSUPP rather than ENODATA, because `ls -l`
// (coreutils) asks every entry for security.selinux and the kernel does
// not cache the answer, while EOPNOTSUPP makes ls stop asking for the
// whole file system (no security module labels a FUSE file system's files
// by xattr; one that was set is still read back). security.capability,
// read at exec, treats both answers alike. POSIX ACL look-ups need no such
// care: the kernel caches ACLs, an absent one too (FUSE_POSIX_ACL); on a
// connection mounted without it (rawFS.acls) they are answered EOPNOTSUPP.
func (r *rawFS) GetXAttr(_ <-chan struct{}, h *fuse.InHeader, name string, dest []byte) (uint32, fuse.Status) {
	start := r.now()
	if !r.acls && isACL(name) {
		r.observe("GETXATTR", start, fuse.ENOTSUP)
		return 0, fuse.ENOTSUP
	}
	n, err := r.fs.GetXattr(h.NodeId, name, dest)
	if err == syscall.ENODATA && strings.HasPrefix(name, "security.") {
		err = syscall.EOPNOTSUPP
	}
	s := status("GETXATTR", err)
	r.observe("GETXATTR", start, s)
	return uint32(n), s
}

// The POSIX ACL attributes.
const (
	aclAccess  = "system.posix_acl_access"
	aclDefault = "system.posix_acl_default"
)

// isACL says whether name is a POSIX ACL attribute.
func isACL(name string) bool { return name == aclAccess || name == aclDefault }

func (r *rawFS) ListXAttr(_ <-chan struct{}, h *fuse.InHeader, dest []byte) (uint32, fuse.Status) {
	start := r.now()
	n, err := r.fs.ListXattr(h.NodeId, dest)
	s := status("LISTXATTR", err)
	r.observe("LISTXATTR", start, s)
	return uint32(n), s
}

// releaseGrace bounds how long adding a seal waits for writers that have
// been closed but not yet released: the kernel sends RELEASE after close(2)
// returns, so "close the writer, then seal" would otherwise race.
const releaseGrace = 200 * time.Millisecond

// grace is how long a conflict waits for RELEASEs: releaseGrace, or none
// when requests come over io_uring, where a RELEASE from the same CPU
// queues behind the very request that would wait for it.
func (r *rawFS) grace() time.Duration {
	if r.onRing.Load() {
		return 0
	}
	return releaseGrace
}

func (r *rawFS) SetXAttr(_ <-chan struct{}, in *fuse.SetXAttrIn, name string, value []byte) fuse.Status {
	start := time.Now()
	if !r.acls && isACL(name) {
		r.observe("SETXATTR", start, fuse.ENOTSUP)
		return fuse.ENOTSUP
	}
	err := r.fs.SetXattr(in.NodeId, name, value, int(in.Flags))
	for err == syscall.EBUSY && name == memfs.SealsXattr && time.Since(start) < r.grace() {
		time.Sleep(time.Millisecond)
		err = r.fs.SetXattr(in.NodeId, name, value, int(in.Flags))
	}
	if err == nil && name == aclAccess && r.setxattrExt && in.SetXAttrFlags&fuse.SETXATTR_ACL_KILL_SGID != 0 {
		err = r.killSGID(in.NodeId)
	}
	r.changed(err, in.NodeId)
	s := status("SETXATTR", err)
	r.observe("SETXATTR", start, s)
	return s
}

// killSGID clears ino's set-group-ID bit after its access ACL was set by
// a caller neither in the file's group nor holding CAP_FSETID, as Linux
// does (posix_acl_update_mode); the kernel, which knows the caller's
// groups, says so with FUSE_SETXATTR_ACL_KILL_SGID. It has the kernel
// forget the mode it holds.
func (r *rawFS) killSGID(ino uint64) error {
	st, err := r.fs.GetAttr(ino)
	if err != nil || st.Mode&unix.S_ISGID == 0 {
		return err
	}
	if _, err := r.fs.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: st.Mode & 0o7777 &^ unix.S_ISGID}); err != nil {
		return err
	}
	r.dropAttrs(ino)
	return nil
}

func (r *rawFS) RemoveXAttr(_ <-chan struct{}, h *fuse.InHeader, name string) fuse.Status {
	start := r.now()
	err := r.fs.RemoveXattr(h.NodeId, name)
	r.changed(err, h.NodeId)
	s := status("REMOVEXATTR", err)
	r.observe("REMOVEXATTR", start, s)
	return s
}

func (r *rawFS) StatFs(_ <-chan struct{}, h *fuse.InHeader, out *fuse.StatfsOut) fuse.Status {
	start := r.now()
	st, err := r.fs.StatFS()
	s := status("STATFS", err)
	if s == fuse.OK {
		out.Blocks, out.Bfree, out.Bavail = st.Blocks, st.Bfree, st.Bavail
		out.Files, out.Ffree = st.Files, st.Ffree
		out.Bsize, out.Frsize = uint32(st.Bsize), uint32(st.Frsize)
		out.NameLen = uint32(st.Namelen)
	}
	r.observe("STATFS", start, s)
	return s
}

func (r *rawFS) OnUnmount() {}
