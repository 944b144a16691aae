package fusefs

import (
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// file returns the vfs.File open as fh.
func (r *rawFS) file(fh uint64) (vfs.File, fuse.Status) {
	switch h := r.handles.get(fh).(type) {
	case *openFile:
		return h.File, fuse.OK
	case *deadHandle:
		return nil, fuse.EIO
	}
	return nil, fuse.EBADF
}

// fileOrNode returns the vfs.File open as fh; with fh 0, on a read-only
// mount (files opened by the kernel without OPEN, see Open), a fresh
// read-only open of the node ino, which the caller releases. A successor
// serves those whatever its NoOpen says.
func (r *rawFS) fileOrNode(fh, ino uint64) (vfs.File, fuse.Status) {
	if fh != 0 || !r.opts.ReadOnly {
		return r.file(fh)
	}
	f, err := r.fs.Open(ino, unix.O_RDONLY, vfs.OpenOptions{})
	if err != nil {
		return nil, status("OPEN", err)
	}
	return f, fuse.OK
}

// dir returns the vfs.Dir open as fh.
func (r *rawFS) dir(fh uint64) (vfs.Dir, fuse.Status) {
	switch h := r.handles.get(fh).(type) {
	case vfs.Dir:
		return h, fuse.OK
	case *deadHandle:
		return nil, fuse.EIO
	}
	return nil, fuse.EBADF
}

// openOptions are the memfs options for an open by the caller h with FUSE
// open_flags. A caller other than root is taken to lack CAP_FSETID.
func (r *rawFS) openOptions(h *fuse.InHeader, openFlags uint32) vfs.OpenOptions {
	r.backingMu.Lock()
	pt := r.passthrough
	r.backingMu.Unlock()
	return vfs.OpenOptions{
		Direct:      pt,
		KillSuidGid: openFlags&fuse.OPEN_KILL_SUIDGID != 0 || h.Uid != 0,
	}
}

// opened registers of and tells the kernel how to do its I/O: through
// passthrough to the backing file where the file system allows it; else
// through this server, with the page cache when passthrough is off for the
// whole mount and direct I/O otherwise.
//
// The kernel allows one I/O mode per inode at a time: while an inode has
// passthrough opens, every other open must share their backing file. An
// open that cannot (a grow-sealed writer; an overlay writer while readers
// hold the lower file) fails with ETXTBSY, the kernel's own errno for
// conflicting modes and Linux's for writing a file in use. withEntry: see
// finishOpen.
func (r *rawFS) opened(of *openFile, flags uint32, out *fuse.OpenOut, withEntry bool) fuse.Status {
	r.backingMu.Lock()
	defer r.backingMu.Unlock()
	// Opens closed just before this one may not be released yet (RELEASE
	// is asynchronous): give them r.grace() before calling it a conflict.
	for start := time.Now(); ; {
		s := r.openModeLocked(of.ino, of.File, out)
		if s != fuse.Status(syscall.ETXTBSY) || time.Since(start) >= r.grace() {
			if s != fuse.OK {
				return s
			}
			rec := handleRecord{Kind: recFile, Flags: flags, Ino: of.ino}
			if hf, ok := of.File.(vfs.HandleFile); ok {
				if ino, gen, ok := hf.Handle(); ok {
					rec.HasData, rec.DataGen, rec.DataIno = 1, gen, ino
				}
			}
			if out.OpenFlags&fuse.FOPEN_PASSTHROUGH != 0 {
				b := r.backing[of.ino]
				of.backed = true
				of.rdwr = isRDWR(flags, true)
				rec.Backed, rec.BackingID, rec.BackingDev, rec.BackingIno = 1, b.id, b.file.dev, b.file.ino
			}
			fh, err := r.handles.add(of, rec)
			if err != nil {
				if of.backed {
					r.releaseBackingLocked(of.ino)
				}
				return fuse.Status(err.(syscall.Errno))
			}
			out.Fh = fh
			if of.rdwr {
				r.rdwrOpened(of.ino, !withEntry)
			}
			return fuse.OK
		}
		r.backingMu.Unlock()
		time.Sleep(time.Millisecond)
		r.backingMu.Lock()
	}
}

// openModeLocked sets the I/O mode of an open of ino (see opened).
//
// Preconditions:
//   - r.backingMu is locked.
func (r *rawFS) openModeLocked(ino uint64, f vfs.File, out *fuse.OpenOut) fuse.Status {
	switch {
	case !r.passthrough:
		out.OpenFlags |= fuse.FOPEN_KEEP_CACHE
	case f.Direct():
		if id, ok := r.acquireBackingLocked(ino, f); ok {
			out.OpenFlags |= fuse.FOPEN_PASSTHROUGH
			out.BackingID = id
			return fuse.OK
		}
		fallthrough
	default:
		if b := r.backing[ino]; b != nil && b.refs > 0 {
			return fuse.Status(syscall.ETXTBSY)
		}
		// Served here, beside passthrough opens of other inodes.
		out.OpenFlags |= fuse.FOPEN_DIRECT_IO
	}
	return fuse.OK
}

// acquireBackingLocked returns the passthrough backing id of ino,
// registering fd as its backing file if it has none. An inode's backing
// file may only be shared by opens of the very same file: an overlay inode
// is backed by its lower file until copy-up and by the upper file after,
// and handing the lower's backing to an upper open would have the kernel
// write into the lower. Such an open gets ok false and is served here.
//
// Preconditions:
//   - r.backingMu is locked.
func (r *rawFS) acquireBackingLocked(ino uint64, f vfs.File) (int32, bool) {
	fd := f.Fd()
	var file fileID
	if k, ok := f.(fileKnower); ok {
		file.dev, file.ino = k.FileID()
	} else {
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return 0, false
		}
		file = fileID{st.Dev, st.Ino}
	}
	if b := r.backing[ino]; b != nil {
		if b.file == file {
			b.refs++
			return b.id, true
		}
		if b.refs > 0 {
			return 0, false
		}
		// Idle, on the file the inode had before a copy-up.
		r.closeBackingLocked(ino, b)
	}
	id, errno := r.dev.openBacking(fd)
	if errno != 0 {
		// The kernel refuses passthrough (no CAP_SYS_ADMIN, an old kernel,
		// a backing file system it cannot stack on): serve I/O ourselves
		// from now on, and say so once.
		r.passthrough = false
		klog.InfoS("FUSE passthrough unavailable; serving reads and writes through the daemon", "fsName", r.opts.FsName, "err", errno)
		return 0, false
	}
	r.backing[ino] = &backingFile{id: id, refs: 1, file: file}
	return id, true
}

func (r *rawFS) releaseBacking(ino uint64) {
	r.backingMu.Lock()
	defer r.backingMu.Unlock()
	r.releaseBackingLocked(ino)
}

// releaseBackingLocked drops a reference on ino's backing file. The last
// leaves it registered, idle, with its record (see rawFS.backing); or
// unregisters it when the records are at their bound.
//
// Preconditions:
//   - r.backingMu is locked.
func (r *rawFS) releaseBackingLocked(ino uint64) {
	b := r.backing[ino]
	if b == nil {
		return
	}
	if b.refs--; b.refs > 0 || b.recFh != 0 {
		return
	}
	if r.recordedBacking < maxRecordedBacking {
		fh, err := r.handles.add(&recordedBacking{ino: ino}, handleRecord{
			Kind: recBacking, Ino: ino, BackingID: b.id, BackingDev: b.file.dev, BackingIno: b.file.ino,
		})
		if err == nil {
			b.recFh = fh
			r.recordedBacking++
			return
		}
	}
	r.closeBackingLocked(ino, b)
}

// closeBackingLocked unregisters b, ino's backing file, which no open
// uses. Its record goes first: a crash in between leaves a registration
// nobody closes until the connection ends, never a record of a closed id.
//
// Preconditions:
//   - r.backingMu is locked; b.refs == 0.
func (r *rawFS) closeBackingLocked(ino uint64, b *backingFile) {
	if b.recFh != 0 {
		r.handles.remove(b.recFh)
		r.recordedBacking--
	}
	delete(r.backing, ino)
	if errno := r.dev.closeBacking(b.id); errno != 0 {
		klog.ErrorS(errno, "Unregistering passthrough backing file", "fsName", r.opts.FsName, "ino", ino)
	}
}

// forgetBacking unregisters ino's idle backing file, if any: the kernel
// has forgotten the inode (FORGET), and the next open, if any, comes after
// a new lookup. A FORGET of a node the kernel still holds (it sends some
// for failed lookups) only costs that open a registration.
func (r *rawFS) forgetBacking(ino uint64) {
	r.backingMu.Lock()
	defer r.backingMu.Unlock()
	if b := r.backing[ino]; b != nil && b.refs == 0 {
		r.closeBackingLocked(ino, b)
	}
}

// passthroughActive says whether passthrough is in use.
func (r *rawFS) passthroughActive() bool {
	r.backingMu.Lock()
	defer r.backingMu.Unlock()
	return r.passthrough
}

type openFile struct {
	vfs.File
	ino uint64
	// backed says the open holds a reference on the inode's backing file.
	backed bool
	// rdwr says the open reads and writes through passthrough, so a
	// shared mapping of it can store unseen (counted in rawFS.rdwr).
	rdwr bool
}

func (r *rawFS) Create(_ <-chan struct{}, in *fuse.CreateIn, name string, out *fuse.CreateOut) fuse.Status {
	start := r.now()
	o := r.openOptions(&in.InHeader, in.OpenFlags)
	e, f, err := r.fs.Create(in.NodeId, name, int(in.Flags), in.Mode, caller(&in.InHeader, in.Umask), o)
	if m, ok := r.made(&in.InHeader, err, in.NodeId, name); ok {
		// An O_EXCL create the dead server carried out: open what it made.
		e = m
		if f, err = r.fs.Open(e.Ino(), int(in.Flags)&^(unix.O_CREAT|unix.O_EXCL|unix.O_TRUNC), o); err != nil {
			r.fs.Forget(e.Ino(), 1)
		}
	}
	r.changed(err, in.NodeId)
	s := status("CREATE", err)
	if s == fuse.OK {
		if s = r.finishOpen(e.Ino(), in.Flags, f, &out.OpenOut, true); s == fuse.OK {
			r.fillEntry(&out.EntryOut, &e)
			createdEmpty(&out.EntryOut, &e.Stat, 1)
		} else {
			r.fs.Forget(e.Ino(), 1)
		}
	}
	r.observe("CREATE", start, s)
	return s
}

func (r *rawFS) Tmpfile(_ <-chan struct{}, in *fuse.CreateIn, out *fuse.CreateOut) fuse.Status {
	start := r.now()
	e, f, err := r.fs.Tmpfile(in.NodeId, int(in.Flags), in.Mode, caller(&in.InHeader, in.Umask), r.openOptions(&in.InHeader, in.OpenFlags))
	r.changed(err, in.NodeId)
	s := status("TMPFILE", err)
	if s == fuse.OK {
		if s = r.finishOpen(e.Ino(), in.Flags, f, &out.OpenOut, true); s == fuse.OK {
			r.fillEntry(&out.EntryOut, &e)
			createdEmpty(&out.EntryOut, &e.Stat, 0)
		} else {
			r.fs.Forget(e.Ino(), 1)
		}
	}
	r.observe("TMPFILE", start, s)
	return s
}

// Open opens a file. With Options.NoOpen on a read-only mount the first
// OPEN is answered ENOSYS: the kernel then opens files itself and never
// sends OPEN or RELEASE again (FUSE_NO_OPEN_SUPPORT), keeps their pages
// cached across opens, and reads what it lacks with READ by node id
// (fileOrNode). No passthrough then: the volume pays a page cache above
// its files', and a cold read comes through this process; warm, a file
// costs no request at all.
func (r *rawFS) Open(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	start := r.now()
	if r.opts.ReadOnly && r.opts.NoOpen {
		r.observe("OPEN", start, fuse.ENOSYS)
		return fuse.ENOSYS
	}
	f, err := r.fs.Open(in.NodeId, int(in.Flags), r.openOptions(&in.InHeader, in.Mode))
	s := status("OPEN", err)
	if s == fuse.OK {
		s = r.finishOpen(in.NodeId, in.Flags, f, out, false)
	}
	r.observe("OPEN", start, s)
	return s
}

// finishOpen answers an open of f with open(2) flags; on failure f is
// released. withEntry says the reply carries ino's attributes too (CREATE,
// TMPFILE), filled after this returns.
func (r *rawFS) finishOpen(ino uint64, flags uint32, f vfs.File, out *fuse.OpenOut, withEntry bool) fuse.Status {
	of := &openFile{File: f, ino: ino}
	if s := r.opened(of, flags, out, withEntry); s != fuse.OK {
		f.Release()
		return s
	}
	return fuse.OK
}

func (r *rawFS) Read(_ <-chan struct{}, in *fuse.ReadIn, buf []byte) (fuse.ReadResult, fuse.Status) {
	start := r.now()
	f, s := r.fileOrNode(in.Fh, in.NodeId)
	if s != fuse.OK {
		return nil, s
	}
	if in.Fh == 0 {
		defer f.Release()
	}
	n, err := f.ReadAt(buf[:min(int(in.Size), len(buf))], int64(in.Offset))
	s = status("READ", err)
	r.observe("READ", start, s)
	if s != fuse.OK {
		return nil, s
	}
	return fuse.ReadResultData(buf[:n]), fuse.OK
}

func (r *rawFS) Write(_ <-chan struct{}, in *fuse.WriteIn, data []byte) (uint32, fuse.Status) {
	start := r.now()
	f, s := r.file(in.Fh)
	if s != fuse.OK {
		return 0, s
	}
	n, err := f.WriteAt(data, int64(in.Offset), in.WriteFlags&fuse.WRITE_KILL_SUIDGID != 0)
	if err != nil && n > 0 {
		// A short write: report what was written; the caller's next
		// write gets the error.
		err = nil
	}
	s = status("WRITE", err)
	r.observe("WRITE", start, s)
	return uint32(n), s
}

func (r *rawFS) Lseek(_ <-chan struct{}, in *fuse.LseekIn, out *fuse.LseekOut) fuse.Status {
	start := r.now()
	f, s := r.fileOrNode(in.Fh, in.NodeId)
	if s != fuse.OK {
		return s
	}
	if in.Fh == 0 {
		defer f.Release()
	}
	off, err := f.Seek(int64(in.Offset), int(in.Whence))
	s = status("LSEEK", err)
	out.Offset = uint64(off)
	r.observe("LSEEK", start, s)
	return s
}

func (r *rawFS) Fallocate(_ <-chan struct{}, in *fuse.FallocateIn) fuse.Status {
	start := r.now()
	f, s := r.file(in.Fh)
	if s != fuse.OK {
		return s
	}
	s = status("FALLOCATE", f.Allocate(in.Mode, int64(in.Offset), int64(in.Length)))
	r.observe("FALLOCATE", start, s)
	return s
}

func (r *rawFS) Fsync(_ <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	f, s := r.file(in.Fh)
	if s != fuse.OK {
		return s
	}
	return status("FSYNC", f.Sync(in.FsyncFlags&1 != 0))
}

// Flush answers ENOSYS, which tells the kernel never to send FLUSH again:
// memfs has nothing to write back at close, and locks are the kernel's, so
// a FLUSH would only add a round trip to every close(2).
func (r *rawFS) Flush(_ <-chan struct{}, _ *fuse.FlushIn) fuse.Status {
	r.observe("FLUSH", r.now(), fuse.ENOSYS)
	return fuse.ENOSYS
}

func (r *rawFS) Release(_ <-chan struct{}, in *fuse.ReleaseIn) {
	h := r.handles.remove(in.Fh)
	var ino uint64
	var backed, rdwr bool
	switch h := h.(type) {
	case *openFile:
		ino, backed, rdwr = h.ino, h.backed, h.rdwr
	case *deadHandle:
		ino, backed, rdwr = h.ino, h.backed, h.rdwr
	default:
		return
	}
	if backed {
		r.releaseBacking(ino)
	}
	switch {
	case rdwr:
		r.rdwrReleased(ino)
	case backed && in.Flags&unix.O_ACCMODE == unix.O_WRONLY:
		// Its writes had the kernel mark the size and times stale
		// (rawfs_writers.go): a listing's full answer refreshes them.
		r.stale.add(ino)
	}
	if f, ok := h.(*openFile); ok {
		f.Release()
	}
}

func (r *rawFS) ReleaseDir(in *fuse.ReleaseIn) {
	if d, ok := r.handles.remove(in.Fh).(vfs.Dir); ok { // a *deadHandle needs nothing more
		d.Close()
	}
}

// releaseAll lets go of every open file and directory, when the server
// ends. Passthrough backing files stay registered: the kernel drops them
// with the connection, or a successor takes them over.
func (r *rawFS) releaseAll() {
	r.closeDirStreams()
	r.handles.mu.Lock()
	open := r.handles.open
	r.handles.open = map[uint64]any{}
	r.handles.mu.Unlock()
	for _, h := range open {
		switch h := h.(type) {
		case *openFile:
			h.Release()
		case vfs.Dir:
			h.Close()
		}
	}
}
