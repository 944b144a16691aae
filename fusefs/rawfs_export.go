package fusefs

import (
	"syscall"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// File handles (FUSE_EXPORT_SUPPORT)
//
// The kernel encodes a FUSE file handle (name_to_handle_at(2), an NFS
// export) as the node id and the generation of the inode. Decoding one
// whose inode it still holds needs no request. For one it has forgotten it
// sends LOOKUP of "." in the node id, and compares the generation of the
// answer with the handle's: a mismatch is ESTALE, and so is ENOENT. A
// directory found so is disconnected; the kernel reconnects it to the root
// with LOOKUP of ".." in it (the parent directory), a READDIR of that
// parent to learn its name, and a LOOKUP of the name, up to a directory it
// holds.
//
// Node ids are inode numbers, so a forgotten one is found again as a
// successor finds the node ids it never looked up (restart_rederive.go):
// the file system itself (vfs.Exporter) if it still holds the inode (an
// open file, a directory a walk met), else by its place in the tree. An
// inode in no directory (removed, or a lower file hidden by a whiteout) is
// ESTALE, as on tmpfs. A memfs inode's generation is its tmpfs inode's,
// and inode numbers are never reused in a tmpfs instance (inode64), so a
// handle never finds another inode. Overlay inodes have generation 0:
// within a volume their numbers are never reused either, but a handle of
// an earlier volume of the same image finds the lower file of the same
// number in a new one (docs/limits.md).
//
// Cost: none on other requests, but the comparison of the name in LOOKUP;
// decoding a forgotten handle may walk the tree (see rederiver).

// lookupDots answers LOOKUP of "." (the node itself) and ".." (a
// directory's parent), which only handle decoding sends.
func (r *rawFS) lookupDots(h *fuse.InHeader, name string, out *fuse.EntryOut) fuse.Status {
	start := r.now()
	var e vfs.Entry
	err := error(syscall.ESTALE)
	if ex, ok := r.fs.(vfs.Exporter); ok {
		if name == "." {
			e, err = ex.LookupInode(h.NodeId)
		} else {
			e, err = ex.LookupParent(h.NodeId)
		}
	}
	return r.entry("LOOKUP", start, out, e, err)
}

// LookupInode passes LookupInode on; an inode fs holds no reference to is
// found again in the tree first, and the reference its derivation leaves
// stands for the one LookupInode adds. ESTALE where fs is no Exporter.
func (r *rederiver) LookupInode(ino uint64) (vfs.Entry, error) {
	ex, ok := r.fs.(vfs.Exporter)
	if !ok {
		return vfs.Entry{}, syscall.ESTALE
	}
	e, err := ex.LookupInode(ino)
	if err != syscall.ESTALE {
		return e, err
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	// A FORGET of the kernel's earlier lookups of ino may still arrive
	// and drop what the derivation found: it is then found once more.
	for range 2 {
		if r.knownLocked(ino) {
			// Found meanwhile, by a name.
			e, err = ex.LookupInode(ino)
		} else if err = r.deriveLocked(ino); err == nil {
			e, err = ex.LookupInode(ino)
			if err == nil {
				// Leaves the derivation's reference, so never the
				// last one.
				r.fs.Forget(ino, 1)
			}
		}
		if err != syscall.ESTALE {
			break
		}
	}
	return e, err
}

// LookupParent passes LookupParent on, as the other methods (ESTALE where
// fs is no Exporter).
func (r *rederiver) LookupParent(ino uint64) (vfs.Entry, error) {
	ex, ok := r.fs.(vfs.Exporter)
	if !ok {
		return vfs.Entry{}, syscall.ESTALE
	}
	e, err := ex.LookupParent(ino)
	if err == syscall.ESTALE && r.rederive(ino) {
		e, err = ex.LookupParent(ino)
	}
	return e, err
}
