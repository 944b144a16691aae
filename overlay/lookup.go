package overlay

import (
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// checkName accepts exactly one path component (memfs.CheckName).
var checkName = memfs.CheckName

// hidden says whether name in parent is the FS's own.
func (fs *FS) hidden(parent *node, name string) bool {
	return parent == fs.root && name == WorkName
}

// Lookup finds name in the directory parent and adds a reference to it.
//
// Errors: ENOENT, ENOTDIR, EINVAL, ENAMETOOLONG.
func (fs *FS) Lookup(parent uint64, name string) (vfs.Entry, error) {
	p, err := fs.get(parent)
	if err != nil {
		return vfs.Entry{}, err
	}
	fs.treeMu.RLock()
	n, st, fresh, err := fs.lookupStatLocked(p, name, false)
	if err == errNeedWrite {
		fs.treeMu.RUnlock()
		fs.treeMu.Lock()
		n, st, fresh, err = fs.lookupStatLocked(p, name, true)
		fs.treeMu.Unlock()
		fs.treeMu.RLock()
	}
	if err != nil {
		fs.treeMu.RUnlock()
		return vfs.Entry{}, err
	}
	if fresh {
		err = fs.fixStatLocked(n, &st)
	} else {
		st, err = fs.statLocked(n)
	}
	fs.treeMu.RUnlock()
	if err != nil {
		fs.unref(n, 1)
		return vfs.Entry{}, err
	}
	return vfs.Entry{Stat: st}, nil
}

// errNeedWrite tells a lookup under a read lock to retry under the write
// lock (to link a hard link into place). It never leaves the package.
var errNeedWrite = syscall.Errno(0x7fff)

// lookupLocked finds name in p and returns its node with one reference
// added.
//
// Preconditions:
//   - fs.treeMu is locked, for writing if write is true; else the result
//     may be errNeedWrite.
func (fs *FS) lookupLocked(p *node, name string, write bool) (*node, error) {
	n, _, _, err := fs.lookupStatLocked(p, name, write)
	return n, err
}

// lookupStatLocked is lookupLocked, and also returns the attributes of the
// node's top layer when the lookup read them (fresh).
//
// Preconditions:
//   - as lookupLocked.
func (fs *FS) lookupStatLocked(p *node, name string, write bool) (n *node, st unix.Stat_t, fresh bool, err error) {
	if p.typ != unix.S_IFDIR {
		return nil, st, false, syscall.ENOTDIR
	}
	if err := checkName(name); err != nil {
		return nil, st, false, err
	}
	if fs.hidden(p, name) {
		return nil, st, false, syscall.ENOENT
	}
	if p.upper != 0 {
		e, err := fs.upper.Lookup(p.upper, name)
		switch err {
		case nil:
			n, err := fs.upperNode(p, name, e)
			if err != nil {
				return nil, st, false, err
			}
			// upperNode consumed e's reference, but n holds one on e.
			return n, e.Stat, n.upper == e.Ino(), nil
		case syscall.ENOENT:
		default:
			return nil, st, false, err
		}
	}
	if !p.hasLower {
		return nil, st, false, syscall.ENOENT
	}
	path := joinPath(p.lowerPath, name)
	st, err = fs.lower.Lstat(path)
	if err == syscall.ENOTDIR || err == syscall.ELOOP {
		err = syscall.ENOENT
	}
	if err != nil {
		return nil, st, false, err
	}
	ino := lowerOvIno(st.Ino)
	if st.Nlink > 1 && st.Mode&unix.S_IFMT != unix.S_IFDIR {
		// Another name of this inode may have been copied up.
		placed, err := fs.placeIndexedLocked(p, name, st.Ino, write)
		if err != nil {
			return nil, st, false, err
		}
		if placed != nil {
			return placed, st, false, nil
		}
	}
	fs.mu.Lock()
	n = fs.nodes[ino]
	if n != nil {
		n.refs++
		fs.mu.Unlock()
		fs.setParent(n, p, name)
		return n, st, n.upper == 0, nil
	}
	n = &node{
		ino:       ino,
		typ:       st.Mode & unix.S_IFMT,
		refs:      1,
		lowerPath: path,
		hasLower:  true,
	}
	fs.nodes[ino] = n
	fs.mu.Unlock()
	fs.setParent(n, p, name)
	return n, st, true, nil
}

// upperNode returns the node of the upper entry e, found as name in p, with
// one reference added; e's memfs reference is consumed.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) upperNode(p *node, name string, e vfs.Entry) (*node, error) {
	m, err := fs.readMeta(e.Ino())
	if err != nil {
		fs.upper.Forget(e.Ino(), 1)
		return nil, err
	}
	if m.whiteout {
		fs.upper.Forget(e.Ino(), 1)
		return nil, syscall.ENOENT
	}
	ino := e.Ino()
	if m.ino != 0 {
		ino = m.ino
	}
	fs.mu.Lock()
	if n := fs.nodes[ino]; n != nil {
		// Hard links share a node, and only copy-up, through the node,
		// gives a lower inode an upper copy: n.upper is e.
		n.refs++
		fs.mu.Unlock()
		fs.upper.Forget(e.Ino(), 1)
		fs.setParent(n, p, name)
		return n, nil
	}
	fs.mu.Unlock()

	n := &node{
		ino:       ino,
		typ:       e.Stat.Mode & unix.S_IFMT,
		refs:      1,
		upper:     e.Ino(),
		hasLower:  m.hasLower,
		lowerPath: m.lowerPath,
	}
	if n.typ == unix.S_IFREG && n.hasLower {
		limit, copied, ok, err := fs.readRanges(e.Ino())
		if err != nil {
			fs.upper.Forget(e.Ino(), 1)
			return nil, err
		}
		if ok {
			n.partial, n.limit, n.copied = true, limit, copied
		} else {
			n.hasLower = false
		}
	}
	if n.typ == unix.S_IFREG && e.Stat.Nlink > 1 && m.ino&lowerBit != 0 {
		n.indexed = fs.isIndexed(m.ino)
	}

	fs.mu.Lock()
	if old := fs.nodes[ino]; old != nil {
		// Registered by a concurrent lookup meanwhile.
		old.refs++
		fs.mu.Unlock()
		fs.upper.Forget(e.Ino(), 1)
		fs.setParent(old, p, name)
		return old, nil
	}
	fs.nodes[ino] = n
	fs.mu.Unlock()
	fs.setParent(n, p, name)
	return n, nil
}

// FindOrphan adds one reference to node ino, which may have no name (a file
// removed while open, or an O_TMPFILE), finding it by its upper inode
// upperIno of generation gen (File.Handle): a successor server reopens such
// files so. ESTALE when that upper inode is gone or is not ino's.
func (fs *FS) FindOrphan(ino, upperIno uint64, gen uint32) error {
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	fs.mu.Lock()
	if n := fs.nodes[ino]; n != nil {
		// Known (by a name, say): keep its place.
		n.refs++
		fs.mu.Unlock()
		return nil
	}
	fs.mu.Unlock()
	e, err := fs.upper.LookupHandle(upperIno, gen)
	if err != nil {
		return err
	}
	n, err := fs.upperNode(nil, "", e)
	if err != nil {
		return err
	}
	if n.ino != ino {
		fs.unref(n, 1)
		return syscall.ESTALE
	}
	return nil
}

// setParent records p/name as n's location, moving n's reference on its
// parent.
func (fs *FS) setParent(n, p *node, name string) {
	fs.mu.Lock()
	old := n.parent
	if old == p {
		n.name = name
		fs.mu.Unlock()
		return
	}
	if p != nil {
		p.refs++
	}
	n.parent, n.name = p, name
	fs.mu.Unlock()
	if old != nil {
		fs.unref(old, 1)
	}
}

// location returns n's parent and name.
func (fs *FS) location(n *node) (*node, string) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return n.parent, n.name
}

// GetAttr returns the attributes of ino.
func (fs *FS) GetAttr(ino uint64) (unix.Stat_t, error) {
	n, err := fs.get(ino)
	if err != nil {
		return unix.Stat_t{}, err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	return fs.statLocked(n)
}

// statLocked returns n's attributes as the overlay shows them.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) statLocked(n *node) (unix.Stat_t, error) {
	var st unix.Stat_t
	var err error
	if n.upper != 0 {
		st, err = fs.upper.GetAttr(n.upper)
	} else {
		st, err = fs.lower.Lstat(n.lowerPath)
	}
	if err != nil {
		return st, err
	}
	return st, fs.fixStatLocked(n, &st)
}

// fixStatLocked turns the attributes of n's top layer into the overlay's:
// its inode number, the link counts of merged directories and of indexed
// hard links, and the blocks of a partly copied-up file.
//
// Preconditions:
//   - fs.treeMu is locked; n.mu is not.
func (fs *FS) fixStatLocked(n *node, st *unix.Stat_t) error {
	st.Ino = n.ino
	if n.typ == unix.S_IFREG && n.upper != 0 && n.hasLower {
		st.Blocks += fs.lowerBlocks(n)
	}
	switch {
	case n.typ == unix.S_IFDIR && n.upper != 0 && n.hasLower:
		subdirs := 0
		ents, err := fs.mergedEntriesLocked(n)
		if err != nil {
			return err
		}
		for _, e := range ents {
			if e.Type == unix.DT_DIR {
				subdirs++
			}
		}
		st.Nlink = uint64(2 + subdirs)
	case n == fs.root:
		st.Nlink-- // WorkName
	case n.indexed && n.upper != 0:
		st.Nlink = uint64(int64(st.Nlink) + fs.linkDelta(n))
	}
	return nil
}

// lowerBlocks returns the 512-byte blocks of n's bytes that still live only
// in the lower, or 0 if n is not partial. The upper copy of a partial file
// is sparse where it was not copied, so its own st_blocks leaves them out:
// a file whose metadata alone was copied up (chmod) would show 0 blocks,
// which tools take for "all holes" (tar --sparse archives it as zeros).
// The count is the lower file's blocks, capped by the pages not copied.
//
// Preconditions:
//   - fs.treeMu is locked; n.mu is not.
func (fs *FS) lowerBlocks(n *node) int64 {
	n.mu.Lock()
	var missing int64
	if n.partial {
		for _, g := range n.copied.gaps(0, n.limit) {
			missing += g.end - g.start
		}
	}
	n.mu.Unlock()
	if missing == 0 {
		return 0
	}
	lst, err := fs.lower.Lstat(n.lowerPath)
	if err != nil {
		// The lower is read-only and outlives its nodes; if it cannot be
		// read, reads fail too. Blocks are advisory: report the upper's.
		return 0
	}
	const pageBlocks = 4096 / 512
	return min(lst.Blocks, (missing+4095)/4096*pageBlocks)
}

// Readlink returns the target of the symlink ino.
//
// Errors: EINVAL (not a symlink).
func (fs *FS) Readlink(ino uint64) (string, error) {
	n, err := fs.get(ino)
	if err != nil {
		return "", err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	if n.typ != unix.S_IFLNK {
		return "", syscall.EINVAL
	}
	if n.upper != 0 {
		return fs.upper.Readlink(n.upper)
	}
	return fs.lower.Readlink(n.lowerPath)
}

// lowerXattrVisible says whether the lower attribute name is shown.
func lowerXattrVisible(name string) bool {
	return !strings.HasPrefix(name, "trusted.memfs.") && name != memfs.SealsXattr
}

// GetXattr reads the attribute name of ino (see memfs.Layer.GetXattr).
//
// Errors: ENODATA, ERANGE.
func (fs *FS) GetXattr(ino uint64, name string, dest []byte) (int, error) {
	n, err := fs.get(ino)
	if err != nil {
		return 0, err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	if n.upper != 0 {
		return fs.upper.GetXattr(n.upper, name, dest)
	}
	if !lowerXattrVisible(name) {
		return 0, syscall.ENODATA
	}
	v, err := fs.lower.GetXattr(n.lowerPath, name)
	if err != nil {
		return 0, err
	}
	return copyOut(dest, v)
}

// ListXattr writes the NUL-terminated attribute names of ino into dest.
//
// Errors: ERANGE.
func (fs *FS) ListXattr(ino uint64, dest []byte) (int, error) {
	n, err := fs.get(ino)
	if err != nil {
		return 0, err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	if n.upper != 0 {
		return fs.upper.ListXattr(n.upper, dest)
	}
	names, err := fs.lower.ListXattr(n.lowerPath)
	if err != nil {
		return 0, err
	}
	var b []byte
	for _, s := range names {
		if lowerXattrVisible(s) {
			b = append(append(b, s...), 0)
		}
	}
	return copyOut(dest, b)
}

// copyOut copies v to dest as getxattr(2) does: the size alone for an
// empty dest, ERANGE for a short one.
func copyOut(dest, v []byte) (int, error) {
	if len(dest) == 0 {
		return len(v), nil
	}
	if len(dest) < len(v) {
		return 0, syscall.ERANGE
	}
	return copy(dest, v), nil
}

// indexName is the name in the hard-link index of the lower file whose
// overlay inode number is ino.
func indexName(ino uint64) string {
	return "i" + strconv.FormatUint(ino, 16)
}
