package overlay

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// initWhiteout finds the shared whiteout in WorkName, or makes it (aside,
// then renamed into place: whiteoutName is never a file without its
// marker), and keeps a reference on it.
func (fs *FS) initWhiteout() error {
	e, err := fs.upper.Lookup(fs.workIno, whiteoutName)
	if err == syscall.ENOENT {
		tmp := fs.tmpName()
		if err := fs.makeWhiteout(tmp); err != nil {
			return err
		}
		if err := fs.upper.Rename(fs.workIno, tmp, fs.workIno, whiteoutName, vfs.RenameNoReplace); err != nil {
			fs.upper.Unlink(fs.workIno, tmp)
			return err
		}
		e, err = fs.upper.Lookup(fs.workIno, whiteoutName)
	}
	if err != nil {
		return err
	}
	fs.whiteoutIno = e.Ino()
	return nil
}

// linkWhiteout makes name, which must be free, in the upper directory dir a
// whiteout: a hard link of the shared one.
func (fs *FS) linkWhiteout(dir uint64, name string) error {
	return fs.upper.AddLink(fs.whiteoutIno, dir, name)
}

// makeWhiteout creates a whiteout inode as tmp in WorkName.
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

// lowerNamed says, without asking the lower, that the lower directory of
// p has name: n, found at p/name, is that lower entry. False means it
// may or may not.
//
// Preconditions:
//   - fs.treeMu is locked; n was found at p/name.
func (fs *FS) lowerNamed(n, p *node, name string) bool {
	return n.hasLower && p.hasLower && n.lowerPath == joinPath(p.lowerPath, name)
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

// inheritingFrom runs mk, which creates an entry in WorkName standing in
// for the upper directory dir, with dir's default POSIX ACL, if any, lent
// to WorkName, so that the entry inherits it as it would in dir. On error
// the entry mk made, if any, is returned with its reference.
//
// Preconditions:
//   - fs.treeMu is locked for writing (nothing else uses WorkName).
func (fs *FS) inheritingFrom(dir uint64, mk func() (vfs.Entry, error)) (vfs.Entry, error) {
	acl, err := fs.upperXattr(dir, aclDefault)
	if err == syscall.ENODATA {
		return mk()
	}
	if err != nil {
		return vfs.Entry{}, err
	}
	if err := fs.upper.SetXattr(fs.workIno, aclDefault, acl, 0); err != nil {
		return vfs.Entry{}, err
	}
	e, err := mk()
	if rerr := fs.upper.RemoveXattr(fs.workIno, aclDefault); err == nil {
		err = rerr
	}
	return e, err
}

// upperXattr returns the attribute name of the upper inode ino.
//
// Errors: ENODATA.
func (fs *FS) upperXattr(ino uint64, name string) ([]byte, error) {
	for {
		n, err := fs.upper.GetXattr(ino, name, nil)
		if err != nil {
			return nil, err
		}
		v := make([]byte, n)
		n, err = fs.upper.GetXattr(ino, name, v)
		if err == syscall.ERANGE {
			continue // grew meanwhile
		}
		return v[:n], err
	}
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
	e, err := fs.inheritingFrom(p.upper, func() (vfs.Entry, error) { return mk(fs.workIno, tmp, c, extra) })
	if err != nil {
		if e.Ino() != 0 {
			fs.upper.Forget(e.Ino(), 1)
			fs.removeAll(fs.workIno, tmp)
		}
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

// removeLocked removes the entry name of p (checked by the caller) from the
// union: its upper entry goes, and a whiteout hides a lower one. inLower
// says the caller knows the lower has name (see lowerNamed); false means
// the lower is asked. upperFree says the caller knows the upper has
// nothing at name (the entry found there is a lower one); false means the
// upper is asked.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) removeLocked(p *node, name string, inLower, upperFree bool) error {
	whiteout := inLower
	if !whiteout {
		var err error
		if whiteout, err = fs.lowerHas(p, name); err != nil {
			return err
		}
	}
	if err := fs.copyUpLocked(p); err != nil {
		return err
	}
	state := upperNone
	if !upperFree {
		var err error
		if state, err = fs.upperAt(p, name); err != nil {
			return err
		}
	}
	switch {
	case state == upperEntry && whiteout:
		tmp := fs.tmpName()
		if err := fs.linkWhiteout(fs.workIno, tmp); err != nil {
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
		if err := fs.setMixed(p); err != nil {
			return err
		}
		return fs.linkWhiteout(p.upper, name)
	}
	return syscall.ENOENT
}

// clearWhiteouts removes the whiteouts from the upper directory of the
// empty-looking directory t.
//
// Preconditions:
//   - fs.treeMu is locked for writing; t shows no entries.
func (fs *FS) clearWhiteouts(t *node) error {
	names, err := fs.upperNames(t.upper)
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := fs.upper.Unlink(t.upper, name); err != nil {
			return err
		}
	}
	return nil
}
