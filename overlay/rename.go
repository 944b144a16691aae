package overlay

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// isAncestor says whether a is d or one of d's ancestors.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) isAncestor(a, d *node) bool {
	for ; d != nil; d, _ = fs.location(d) {
		if d == a {
			return true
		}
	}
	return false
}

// Rename moves name in parent to newName in newParent, as renameat2 with
// flags (0, vfs.RenameNoReplace or vfs.RenameExchange). Lower files and
// directories are copied up (metadata only; a directory keeps its lower
// contents through the lower path recorded in its copy), and a whiteout
// hides the old name if the lower has it: no EXDEV.
//
// Errors: ENOENT, EEXIST, ENOTEMPTY, EISDIR, ENOTDIR, EINVAL (a directory
// into itself, bad flags), EPERM (WorkName).
func (fs *FS) Rename(parent uint64, name string, newParent uint64, newName string, flags uint32) (err error) {
	if flags&^(vfs.RenameNoReplace|vfs.RenameExchange) != 0 || flags == vfs.RenameNoReplace|vfs.RenameExchange {
		return syscall.EINVAL
	}
	p, err := fs.get(parent)
	if err != nil {
		return err
	}
	q, err := fs.get(newParent)
	if err != nil {
		return err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	// A rename that fails part way may have moved a directory or not:
	// the parents' counts of subdirectories are dropped then; one that
	// succeeds adjusts them (renamed below).
	defer func() {
		if err != nil {
			p.forgetSubdirs()
			q.forgetSubdirs()
		}
	}()
	if err := checkName(newName); err != nil {
		return err
	}
	if q.typ != unix.S_IFDIR {
		return syscall.ENOTDIR
	}
	s, err := fs.lookupLocked(p, name, true)
	if err != nil {
		return err
	}
	defer fs.unref(s, 1)
	if fs.hidden(q, newName) {
		return syscall.EPERM
	}
	t, err := fs.lookupLocked(q, newName, true)
	switch err {
	case nil:
		defer fs.unref(t, 1)
	case syscall.ENOENT:
		t = nil
	default:
		return err
	}
	exchange := flags&vfs.RenameExchange != 0
	// The checks in renameat2(2)'s order: existence, ancestry, identity,
	// types, emptiness.
	switch {
	case exchange && t == nil:
		return syscall.ENOENT
	case flags&vfs.RenameNoReplace != 0 && t != nil:
		return syscall.EEXIST
	case s.typ == unix.S_IFDIR && fs.isAncestor(s, q):
		return syscall.EINVAL
	case t != nil && t.typ == unix.S_IFDIR && fs.isAncestor(t, p):
		if exchange {
			return syscall.EINVAL
		}
		return syscall.ENOTEMPTY
	case s == t:
		return nil
	}
	if t != nil && !exchange {
		switch {
		case s.typ == unix.S_IFDIR && t.typ != unix.S_IFDIR:
			return syscall.ENOTDIR
		case s.typ != unix.S_IFDIR && t.typ == unix.S_IFDIR:
			return syscall.EISDIR
		case t.typ == unix.S_IFDIR:
			empty, err := fs.emptyLocked(t)
			if err != nil {
				return err
			}
			if !empty {
				return syscall.ENOTEMPTY
			}
		}
	}
	for _, n := range []*node{p, q, s} {
		if err := fs.copyUpLocked(n); err != nil {
			return err
		}
	}
	if exchange {
		if err := fs.copyUpLocked(t); err != nil {
			return err
		}
		if err := fs.setMixed(p); err != nil {
			return err
		}
		if err := fs.setMixed(q); err != nil {
			return err
		}
		if err := fs.upper.Rename(p.upper, name, q.upper, newName, vfs.RenameExchange); err != nil {
			return err
		}
		fs.setParent(s, q, newName)
		fs.setParent(t, p, name)
		renamed(p, q, s)
		renamed(q, p, t)
		return nil
	}

	if t != nil {
		if err := fs.copyUpLinkLocked(t); err != nil {
			return err
		}
	}
	whiteout, err := fs.lowerHas(p, name)
	if err != nil {
		return err
	}
	state, err := fs.upperAt(q, newName)
	if err != nil {
		return err
	}
	switch {
	case state == upperWhiteout:
		if err := fs.upper.Unlink(q.upper, newName); err != nil {
			return err
		}
	case state == upperEntry && t.typ == unix.S_IFDIR:
		if err := fs.clearWhiteouts(t); err != nil {
			return err
		}
	}
	if err := fs.setMixed(q); err != nil {
		return err
	}
	if err := fs.upper.Rename(p.upper, name, q.upper, newName, 0); err != nil {
		return err
	}
	if whiteout {
		if err := fs.setMixed(p); err != nil {
			return err
		}
		if err := fs.linkWhiteout(p.upper, name); err != nil {
			return err
		}
	}
	renamed(p, q, s)
	if t != nil {
		// t, a directory only if s is one, leaves q.
		if t.typ == unix.S_IFDIR {
			q.addSubdirs(-1)
		}
		fs.detach(t, q, newName)
		if err := fs.dropIndexLocked(t); err != nil {
			return err
		}
	}
	fs.setParent(s, q, newName)
	return nil
}

// renamed adjusts the counts of subdirectories of from and to for n's
// move from one to the other.
//
// Preconditions:
//   - FS.treeMu is locked for writing.
func renamed(from, to, n *node) {
	if n.typ != unix.S_IFDIR || from == to {
		return
	}
	from.addSubdirs(-1)
	to.addSubdirs(1)
}
