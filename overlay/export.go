package overlay

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

var _ vfs.Exporter = (*FS)(nil)

// LookupInode adds one reference to node ino and returns its Entry; it
// implements vfs.Exporter. The caller may hold no reference to ino, but
// somebody must: only a node in the table is found (a node, lower or
// upper, that nobody holds is found by its name only).
//
// Errors: ESTALE (no such node).
func (fs *FS) LookupInode(ino uint64) (vfs.Entry, error) {
	fs.mu.Lock()
	n := fs.nodes[ino]
	if n != nil {
		n.refs++
	}
	fs.mu.Unlock()
	if n == nil {
		return vfs.Entry{}, syscall.ESTALE
	}
	fs.treeMu.RLock()
	e, err := fs.entryOf(n)
	fs.treeMu.RUnlock()
	if err != nil {
		fs.unref(n, 1)
		return vfs.Entry{}, err
	}
	return e, nil
}

// LookupParent returns the directory holding the directory ino, with one
// reference added; the root's parent is the root. It implements
// vfs.Exporter.
//
// Errors: ENOTDIR, ESTALE (ino is not in the table, or was removed).
func (fs *FS) LookupParent(ino uint64) (vfs.Entry, error) {
	n, err := fs.get(ino)
	if err != nil {
		return vfs.Entry{}, err
	}
	if n.typ != unix.S_IFDIR {
		return vfs.Entry{}, syscall.ENOTDIR
	}
	fs.treeMu.RLock()
	fs.mu.Lock()
	p := n.parent
	if n == fs.root {
		p = n
	}
	if p != nil {
		// n holds a reference on its parent, so p is in the table.
		p.refs++
	}
	fs.mu.Unlock()
	if p == nil {
		fs.treeMu.RUnlock()
		return vfs.Entry{}, syscall.ESTALE
	}
	e, err := fs.entryOf(p)
	fs.treeMu.RUnlock()
	if err != nil {
		fs.unref(p, 1)
		return vfs.Entry{}, err
	}
	return e, nil
}
