package overlay

import (
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
	if e.Ino() == fs.whiteoutIno {
		fs.upper.Forget(e.Ino(), 1)
		return nil, syscall.ENOENT
	}
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
		p.kids++
	}
	n.parent, n.name = p, name
	fs.mu.Unlock()
	if old != nil {
		fs.drop(old, 1, true)
	}
}

// location returns n's parent and name.
func (fs *FS) location(n *node) (*node, string) {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	return n.parent, n.name
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

// newNode registers the new upper entry e (made by a user in p as name)
// as a node with one reference, consuming e's memfs reference.
func (fs *FS) newNode(p *node, name string, e vfs.Entry) *node {
	n := &node{ino: e.Ino(), typ: e.Stat.Mode & unix.S_IFMT, refs: 1, upper: e.Ino()}
	fs.mu.Lock()
	if old := fs.nodes[n.ino]; old != nil {
		// A stale node of a recycled inode number; it keeps its own
		// references but leaves the table.
		delete(fs.nodes, n.ino)
	}
	fs.nodes[n.ino] = n
	fs.mu.Unlock()
	fs.setParent(n, p, name)
	return n
}

// entryOf returns n's Entry.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) entryOf(n *node) (vfs.Entry, error) {
	st, err := fs.statLocked(n)
	if err != nil {
		return vfs.Entry{}, err
	}
	return vfs.Entry{Stat: st}, nil
}

// mkEntry runs a namespace creation under the tree lock and returns the
// new entry with one reference.
func (fs *FS) mkEntry(parent uint64, name string, c vfs.Caller, isDir bool, mk func(dir uint64, name string, c vfs.Caller, extra uint32) (vfs.Entry, error)) (vfs.Entry, error) {
	p, err := fs.get(parent)
	if err != nil {
		return vfs.Entry{}, err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	n, err := fs.createLocked(p, name, c, isDir, mk)
	if err != nil {
		if isDir {
			p.forgetSubdirs()
		}
		return vfs.Entry{}, err
	}
	if isDir {
		p.addSubdirs(1)
	}
	e, err := fs.entryOf(n)
	if err != nil {
		fs.unref(n, 1)
	}
	return e, err
}

// Mkdir creates the directory name in parent (see memfs.Layer.Mkdir).
// Over a deleted lower directory the new one is opaque.
//
// Errors: EEXIST, ENOTDIR, ENOSPC, EINVAL, ENAMETOOLONG, EPERM (WorkName).
func (fs *FS) Mkdir(parent uint64, name string, mode uint32, c vfs.Caller) (vfs.Entry, error) {
	return fs.mkEntry(parent, name, c, true, func(dir uint64, name string, c vfs.Caller, extra uint32) (vfs.Entry, error) {
		return fs.upper.Mkdir(dir, name, mode|extra, c)
	})
}

// Mknod creates a regular file, FIFO, socket or device node in the upper
// (see memfs.Layer.Mknod).
func (fs *FS) Mknod(parent uint64, name string, mode uint32, rdev uint64, c vfs.Caller) (vfs.Entry, error) {
	return fs.mkEntry(parent, name, c, false, func(dir uint64, name string, c vfs.Caller, _ uint32) (vfs.Entry, error) {
		return fs.upper.Mknod(dir, name, mode, rdev, c)
	})
}

// Symlink creates the symlink name in parent (see memfs.Layer.Symlink).
func (fs *FS) Symlink(parent uint64, name, target string, c vfs.Caller) (vfs.Entry, error) {
	return fs.mkEntry(parent, name, c, false, func(dir uint64, name string, c vfs.Caller, _ uint32) (vfs.Entry, error) {
		return fs.upper.Symlink(dir, name, target, c)
	})
}

// Link makes name in newParent a new link to ino, copying ino up first.
//
// Errors: EPERM (a directory), EEXIST, ENOENT, EMLINK, ENOSPC, EINVAL.
func (fs *FS) Link(ino, newParent uint64, name string) (vfs.Entry, error) {
	n, err := fs.get(ino)
	if err != nil {
		return vfs.Entry{}, err
	}
	p, err := fs.get(newParent)
	if err != nil {
		return vfs.Entry{}, err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if n.typ == unix.S_IFDIR {
		return vfs.Entry{}, syscall.EPERM
	}
	whiteout, err := fs.prepareCreateLocked(p, name)
	if err != nil {
		return vfs.Entry{}, err
	}
	if err := fs.copyUpLocked(n); err != nil {
		return vfs.Entry{}, err
	}
	var e vfs.Entry
	if whiteout {
		tmp := fs.tmpName()
		if e, err = fs.upper.Link(n.upper, fs.workIno, tmp); err == nil {
			if err = fs.upper.Rename(fs.workIno, tmp, p.upper, name, 0); err != nil {
				fs.upper.Unlink(fs.workIno, tmp)
			}
		}
	} else {
		e, err = fs.upper.Link(n.upper, p.upper, name)
	}
	if err != nil {
		if e.Ino() != 0 {
			fs.upper.Forget(e.Ino(), 1)
		}
		return vfs.Entry{}, err
	}
	fs.upper.Forget(e.Ino(), 1)
	if m, err := fs.readMeta(n.upper); err == nil && m.ino != 0 {
		fs.setMixed(p)
	}
	fs.ref(n)
	out, err := fs.entryOf(n)
	if err != nil {
		fs.unref(n, 1)
	}
	return out, err
}

// Unlink removes the non-directory name from parent; a lower entry is
// hidden by a whiteout.
//
// Errors: ENOENT, EISDIR, ENOTDIR, EINVAL.
func (fs *FS) Unlink(parent uint64, name string) error {
	return fs.remove(parent, name, false)
}

// Rmdir removes the empty directory name from parent.
//
// Errors: ENOENT, ENOTDIR, ENOTEMPTY, EINVAL.
func (fs *FS) Rmdir(parent uint64, name string) error {
	return fs.remove(parent, name, true)
}

func (fs *FS) remove(parent uint64, name string, dir bool) error {
	p, err := fs.get(parent)
	if err != nil {
		return err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	n, st, fresh, err := fs.lookupStatLocked(p, name, true)
	if err != nil {
		return err
	}
	defer fs.unref(n, 1)
	switch {
	case dir && n.typ != unix.S_IFDIR:
		return syscall.ENOTDIR
	case !dir && n.typ == unix.S_IFDIR:
		return syscall.EISDIR
	case !dir && fresh && n.upper == 0:
		// The lookup read the lower file's attributes: its link count
		// says whether copyUpLinkLocked has work.
		if st.Nlink > 1 && n.typ == unix.S_IFREG {
			if err := fs.copyUpLocked(n); err != nil {
				return err
			}
		}
	case !dir:
		if err := fs.copyUpLinkLocked(n); err != nil {
			return err
		}
	case dir:
		empty, err := fs.emptyLocked(n)
		if err != nil {
			return err
		}
		if !empty {
			// Linux refuses an immutable or append-only directory
			// before looking inside it.
			if n.upper != 0 {
				if fl, err := fs.upper.GetFlags(n.upper); err == nil && fl&(fsImmutableFl|fsAppendFl) != 0 {
					return syscall.EPERM
				}
			}
			return syscall.ENOTEMPTY
		}
	}
	// A lower node found at p/name says the upper has nothing there.
	if err := fs.removeLocked(p, name, fs.lowerNamed(n, p, name), n.upper == 0); err != nil {
		if dir {
			p.forgetSubdirs()
		}
		return err
	}
	if dir {
		p.addSubdirs(-1)
	}
	fs.detach(n, p, name)
	return fs.dropIndexLocked(n)
}

// dropIndexLocked removes n's index entry once it is n's only link and no
// lower name of n is left to place, so that the bytes of a removed file
// are freed.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) dropIndexLocked(n *node) error {
	if !n.indexed {
		return nil
	}
	st, err := fs.upper.GetAttr(n.upper)
	if err != nil {
		return err
	}
	lowerNlink, placed, err := fs.readLinks(n.upper)
	if err != nil || st.Nlink != 1 || placed < lowerNlink {
		return err
	}
	if err := fs.upper.Unlink(fs.workIno, indexName(n.ino)); err != nil {
		return err
	}
	n.indexed = false
	return nil
}

// copyUpLinkLocked copies n up if it is a lower file with other names, so
// that the index counts the removal of this name in their link count.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) copyUpLinkLocked(n *node) error {
	if n.typ != unix.S_IFREG || n.upper != 0 {
		return nil
	}
	st, err := fs.lower.Lstat(n.lowerPath)
	if err != nil || st.Nlink < 2 {
		return err
	}
	return fs.copyUpLocked(n)
}

// detach forgets that n is at p/name.
func (fs *FS) detach(n, p *node, name string) {
	fs.mu.Lock()
	at := n.parent == p && n.name == name
	fs.mu.Unlock()
	if at {
		fs.setParent(n, nil, "")
	}
}

// emptyLocked says whether the directory n shows no entries.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) emptyLocked(n *node) (bool, error) {
	ents, err := fs.mergedEntriesLocked(n)
	return len(ents) == 0, err
}
