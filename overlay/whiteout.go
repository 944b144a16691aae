package overlay

import (
	"syscall"

	"github.com/csi-memfs/csi-memfs/vfs"
	"golang.org/x/sys/unix"
)

// makeWhiteout creates a whiteout as tmp in WorkName.
func (fs *FS) makeWhiteout(tmp string) error {
	e, err := fs.upper.Mknod(fs.workIno, tmp, unix.S_IFREG, 0, vfs.Root)
	if err != nil {
		return err
	}
	defer fs.upper.Forget(e.Ino(), 1)
	if err := fs.upper.SetMarker(e.Ino(), markerOv, meta{whiteout: true}.encode(), 0); err != nil {
		fs.upper.Unlink(fs.workIno, tmp)
		return err
	}
	return nil
}

// lowerHas says whether the lower directory of p has name.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) lowerHas(p *node, name string) (bool, error) {
	if !p.hasLower {
		return false, nil
	}
	_, err := fs.lower.Lstat(joinPath(p.lowerPath, name))
	switch err {
	case nil:
		return true, nil
	case syscall.ENOENT, syscall.ENOTDIR:
		return false, nil
	}
	return false, err
}

// upperState says what the upper directory of p holds at name.
type upperState int

const (
	upperNone upperState = iota
	upperWhiteout
	upperEntry
)

// upperAt reports what the upper directory of p holds at name.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) upperAt(p *node, name string) (upperState, error) {
	if p.upper == 0 {
		return upperNone, nil
	}
	m, err := fs.readMetaAt(p.upper, name)
	switch {
	case err == syscall.ENOENT:
		return upperNone, nil
	case err != nil:
		return upperNone, err
	case m.whiteout:
		return upperWhiteout, nil
	}
	return upperEntry, nil
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

// prepareCreateLocked checks that name is free in p and makes p ready to
// hold a new upper entry; whiteout says a whiteout is to be replaced.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) prepareCreateLocked(p *node, name string) (whiteout bool, err error) {
	if p.typ != unix.S_IFDIR {
		return false, syscall.ENOTDIR
	}
	if err := checkName(name); err != nil {
		return false, err
	}
	if fs.hidden(p, name) {
		return false, syscall.EPERM
	}
	n, err := fs.lookupLocked(p, name, true)
	if err == nil {
		fs.unref(n, 1)
		return false, syscall.EEXIST
	}
	if err != syscall.ENOENT {
		return false, err
	}
	if err := fs.copyUpLocked(p); err != nil {
		return false, err
	}
	st, err := fs.upperAt(p, name)
	return st == upperWhiteout, err
}

// creatorIn returns the caller and extra mode bits for an entry built in
// WorkName on behalf of c in p: what creating it in p directly would give.
func (fs *FS) creatorIn(p *node, c vfs.Caller, isDir bool) (vfs.Caller, uint32, error) {
	st, err := fs.upper.GetAttr(p.upper)
	if err != nil {
		return c, 0, err
	}
	if st.Mode&unix.S_ISGID == 0 {
		return c, 0, nil
	}
	c.Gid = st.Gid
	if isDir {
		return c, unix.S_ISGID, nil
	}
	return c, 0, nil
}

// createLocked makes a new entry name in p with mk, which creates it in an
// upper directory under the given name.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) createLocked(p *node, name string, c vfs.Caller, isDir bool, mk func(dir uint64, name string, c vfs.Caller, extra uint32) (vfs.Entry, error)) (*node, error) {
	whiteout, err := fs.prepareCreateLocked(p, name)
	if err != nil {
		return nil, err
	}
	if !whiteout {
		e, err := mk(p.upper, name, c, 0)
		if err != nil {
			return nil, err
		}
		return fs.newNode(p, name, e), nil
	}
	// Build the entry aside and swap it with the whiteout, so the lower
	// entry never shows through.
	c, extra, err := fs.creatorIn(p, c, isDir)
	if err != nil {
		return nil, err
	}
	tmp := fs.tmpName()
	e, err := mk(fs.workIno, tmp, c, extra)
	if err != nil {
		return nil, err
	}
	if extra != 0 && e.Stat.Mode&extra != extra {
		// mkdir(2) ignores set-group-ID in its mode: the bit comes only
		// from the parent, and the work directory is not the parent.
		e.Stat, err = fs.upper.SetAttr(e.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: e.Stat.Mode&07777 | extra})
		if err != nil {
			fs.upper.Forget(e.Ino(), 1)
			fs.removeAll(fs.workIno, tmp)
			return nil, err
		}
	}
	if err := fs.upper.Rename(fs.workIno, tmp, p.upper, name, vfs.RenameExchange); err != nil {
		fs.upper.Forget(e.Ino(), 1)
		fs.removeAll(fs.workIno, tmp)
		return nil, err
	}
	fs.upper.Unlink(fs.workIno, tmp)
	return fs.newNode(p, name, e), nil
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
		return vfs.Entry{}, err
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
		fs.setMixed(p.upper)
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
	n, err := fs.lookupLocked(p, name, true)
	if err != nil {
		return err
	}
	defer fs.unref(n, 1)
	switch {
	case dir && n.typ != unix.S_IFDIR:
		return syscall.ENOTDIR
	case !dir && n.typ == unix.S_IFDIR:
		return syscall.EISDIR
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
			return syscall.ENOTEMPTY
		}
	}
	if err := fs.removeLocked(p, name); err != nil {
		return err
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

// removeLocked removes the entry name of p (checked by the caller) from the
// union: its upper entry goes, and a whiteout hides a lower one.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) removeLocked(p *node, name string) error {
	whiteout, err := fs.lowerHas(p, name)
	if err != nil {
		return err
	}
	if err := fs.copyUpLocked(p); err != nil {
		return err
	}
	state, err := fs.upperAt(p, name)
	if err != nil {
		return err
	}
	switch {
	case state == upperEntry && whiteout:
		tmp := fs.tmpName()
		if err := fs.makeWhiteout(tmp); err != nil {
			return err
		}
		if err := fs.upper.Rename(fs.workIno, tmp, p.upper, name, vfs.RenameExchange); err != nil {
			fs.upper.Unlink(fs.workIno, tmp)
			return err
		}
		return fs.removeAll(fs.workIno, tmp)
	case state == upperEntry:
		err := fs.upper.Unlink(p.upper, name)
		if err == syscall.EISDIR {
			err = fs.upper.Rmdir(p.upper, name)
			if err == syscall.ENOTEMPTY {
				// Only whiteouts are left in it.
				tmp := fs.tmpName()
				if err := fs.upper.Rename(p.upper, name, fs.workIno, tmp, vfs.RenameNoReplace); err != nil {
					return err
				}
				return fs.removeAll(fs.workIno, tmp)
			}
		}
		return err
	case whiteout:
		tmp := fs.tmpName()
		if err := fs.makeWhiteout(tmp); err != nil {
			return err
		}
		if err := fs.setMixed(p.upper); err != nil {
			fs.upper.Unlink(fs.workIno, tmp)
			return err
		}
		if err := fs.upper.Rename(fs.workIno, tmp, p.upper, name, 0); err != nil {
			fs.upper.Unlink(fs.workIno, tmp)
			return err
		}
		return nil
	}
	return syscall.ENOENT
}
