package fusefs

import (
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Directories are read without OPENDIR. The first OPENDIR of a connection
// is answered ENOSYS, and the kernel then opens directories itself and
// never sends OPENDIR or RELEASEDIR again (Linux >= 5.1): two requests
// less per directory walked. It keeps what it read in its directory cache
// (FOPEN_CACHE_DIR is the default then) and sends READDIR with file handle
// 0, which is served by node id and offset: from a stream kept from the
// previous READDIR of the same directory when the offset continues it,
// else from a fresh open of the directory. A successor server serves
// these from the tree alone; directory handles adopted from a predecessor
// that answered OPENDIR are still served by handle.

// maxDirStreams bounds the open directories kept between READDIRs.
const maxDirStreams = 64

// dirStream is a directory open between READDIRs of the kernel.
type dirStream struct {
	d vfs.Dir
	// next is the offset the next READDIR continues from.
	next int64
}

// takeDirStream returns a stream of the directory ino positioned at off:
// the kept one if it is there, else a fresh open. The caller owns it until
// it calls putDirStream.
func (r *rawFS) takeDirStream(ino uint64, off int64) (*dirStream, error) {
	r.dirsMu.Lock()
	ds := r.dirs[ino]
	if ds != nil {
		delete(r.dirs, ino)
	}
	r.dirsMu.Unlock()
	if ds != nil && ds.next == off && off != 0 {
		return ds, nil
	}
	if ds != nil {
		ds.d.Close()
	}
	d, err := r.fs.OpenDir(ino)
	if err != nil {
		return nil, err
	}
	return &dirStream{d: d, next: off}, nil
}

// putDirStream keeps ds for the next READDIR of ino, or closes it when
// the directory has been read to its end.
func (r *rawFS) putDirStream(ino uint64, ds *dirStream, ended bool) {
	var drop []*dirStream
	if ended {
		drop = append(drop, ds)
	} else {
		r.dirsMu.Lock()
		if old := r.dirs[ino]; old != nil {
			// Out of the map first, so that the eviction below cannot
			// pick it again and close it twice.
			delete(r.dirs, ino)
			drop = append(drop, old)
		}
		for k, v := range r.dirs {
			if len(r.dirs) < maxDirStreams {
				break
			}
			delete(r.dirs, k)
			drop = append(drop, v)
		}
		r.dirs[ino] = ds
		r.dirsMu.Unlock()
	}
	for _, ds := range drop {
		ds.d.Close()
	}
}

// closeDirStreams closes every kept stream.
func (r *rawFS) closeDirStreams() {
	r.dirsMu.Lock()
	dirs := r.dirs
	r.dirs = map[uint64]*dirStream{}
	r.dirsMu.Unlock()
	for _, ds := range dirs {
		ds.d.Close()
	}
}

// readDir serves READDIR and READDIRPLUS: add is called with each entry
// from in.Offset on until it returns false.
func (r *rawFS) readDir(in *fuse.ReadIn, add func(*vfs.DirEntry) bool) fuse.Status {
	if in.Fh != 0 {
		d, s := r.dir(in.Fh)
		if s != fuse.OK {
			return s
		}
		return status("READDIR", d.ReadDir(int64(in.Offset), add))
	}
	ds, err := r.takeDirStream(in.NodeId, int64(in.Offset))
	if err != nil {
		return status("READDIR", err)
	}
	ended := true
	err = ds.d.ReadDir(ds.next, func(e *vfs.DirEntry) bool {
		if !add(e) {
			ended = false
			return false
		}
		ds.next = e.Off
		return true
	})
	if err != nil {
		ds.d.Close()
		return status("READDIR", err)
	}
	r.putDirStream(in.NodeId, ds, ended)
	return fuse.OK
}

func (r *rawFS) OpenDir(_ <-chan struct{}, in *fuse.OpenIn, out *fuse.OpenOut) fuse.Status {
	r.observe("OPENDIR", r.now(), fuse.ENOSYS)
	return fuse.ENOSYS
}

func (r *rawFS) ReadDir(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	start := r.now()
	s := r.readDir(in, func(e *vfs.DirEntry) bool {
		return out.AddDirEntry(fuse.DirEntry{
			Name: e.Name,
			Ino:  e.Ino,
			Off:  uint64(e.Off),
			// DT_* << 12 is the S_IF* type.
			Mode: uint32(e.Type) << 12,
		})
	})
	r.observe("READDIR", start, s)
	return s
}

func (r *rawFS) FsyncDir(_ <-chan struct{}, in *fuse.FsyncIn) fuse.Status {
	if in.Fh == 0 {
		// Nothing to sync in memory: ENOSYS, and the kernel stops asking.
		return fuse.ENOSYS
	}
	d, s := r.dir(in.Fh)
	if s != fuse.OK {
		return s
	}
	return status("FSYNCDIR", d.Sync())
}

// ReadDirPlus serves READDIRPLUS, which the kernel sends in its automatic
// mode (FUSE_READDIRPLUS_AUTO) for the first chunk of a directory and
// after lookups in it: each entry comes with what a LOOKUP of it would
// answer, so that a walk that goes on to stat or open the entries sends no
// LOOKUP for them. Each entry so answered counts as a lookup, as a LOOKUP
// reply would.
//
// An entry whose inode the file system says is held (vfs.Holder), and
// "." and "..", go with node id 0 instead: the kernel's "no information"
// (fuse_direntplus_link), on which it emits the name and changes nothing,
// takes no lookup count and touches no dentry. A held inode is one the
// kernel looked up and has not forgotten, so it has the dentry and the
// attributes already (they stay valid for cacheTimeout, or come by
// GETATTR); a READDIRPLUS after creating and stat'ing the files of a
// directory then costs no Lookup, which would find every entry again in
// the file system and take a reference the kernel gives back at once.
// Unless this server made the kernel drop that inode's attributes
// (staleAttrs, rawfs_stale.go): then the full answer refreshes them, and
// the stat or open that follows a listing sends no GETATTR (the files an
// untar just wrote, listed by find and read by cat).
//
// Held is a hint and may be wrong by the time the reply arrives, both
// ways, without harm. If the kernel forgets the inode between the check
// and the reply (or never held it: a reference that is the server's own,
// a kept directory stream), node id 0 leaves nothing in the kernel
// pointing at it, and a later access of the name sends a LOOKUP. If the
// kernel holds an inode the file system does not know (a successor's,
// before it meets it), the entry is answered in full, as any other.
func (r *rawFS) ReadDirPlus(_ <-chan struct{}, in *fuse.ReadIn, out *fuse.DirEntryList) fuse.Status {
	start := r.now()
	holder, _ := r.fs.(vfs.Holder)
	s := r.readDir(in, func(e *vfs.DirEntry) bool {
		eo := out.AddDirLookupEntry(fuse.DirEntry{
			Name: e.Name,
			Ino:  e.Ino,
			Off:  uint64(e.Off),
			Mode: uint32(e.Type) << 12,
		})
		if eo == nil {
			return false
		}
		if e.Name == "." || e.Name == ".." || holder != nil && holder.Held(e.Ino) && !r.stale.has(e.Ino) {
			return true
		}
		if le, err := r.fs.Lookup(in.NodeId, e.Name); err == nil {
			r.fillEntry(eo, &le)
			out.FixMode(le.Stat.Mode)
		}
		return true
	})
	r.observe("READDIRPLUS", start, s)
	return s
}
