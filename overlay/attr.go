package overlay

import (
	"syscall"

	"github.com/csi-memfs/csi-memfs/vfs"
	"golang.org/x/sys/unix"
)

// SetAttr changes the attributes of ino (see memfs.Layer.SetAttr), copying
// it up first; f is an open File of ino or nil (a vfs.File that is not one
// of this overlay's is ignored). Shrinking a partly
// copied-up file below its lower limit forgets the lower bytes beyond.
//
// Errors: as memfs.Layer.SetAttr.
func (fs *FS) SetAttr(ino uint64, f vfs.File, a vfs.SetAttr) (unix.Stat_t, error) {
	n, err := fs.get(ino)
	if err != nil {
		return unix.Stat_t{}, err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if err := fs.copyUpLocked(n); err != nil {
		return unix.Stat_t{}, err
	}
	var mf vfs.File
	if of, _ := f.(*File); of != nil && of.n == n && of.writable && of.uf != nil {
		mf = of.uf
	}
	var st unix.Stat_t
	if a.Valid&vfs.SetSize != 0 && n.typ == unix.S_IFREG {
		st, err = fs.truncateLocked(n, mf, a)
	} else {
		st, err = fs.upper.SetAttr(n.upper, mf, a)
	}
	if err != nil {
		return st, err
	}
	return st, fs.fixStatLocked(n, &st)
}

// truncateLocked is SetAttr with a size change of the copied-up file n.
//
// Preconditions:
//   - fs.treeMu is locked for writing; n.upper != 0.
func (fs *FS) truncateLocked(n *node, mf vfs.File, a vfs.SetAttr) (unix.Stat_t, error) {
	n.mu.Lock()
	defer n.mu.Unlock()
	if !n.partial || a.Size >= n.limit {
		return fs.upper.SetAttr(n.upper, mf, a)
	}
	// Forget the lower bytes first: if the record cannot be written the
	// file is unchanged; if the truncate fails the record is put back.
	saved := n.saveState()
	n.limit, n.copied = max(a.Size, 0), n.copied.clip(max(a.Size, 0))
	if err := fs.saveRangesLocked(n); err != nil {
		n.restoreState(saved)
		return unix.Stat_t{}, err
	}
	st, err := fs.upper.SetAttr(n.upper, mf, a)
	if err != nil {
		n.restoreState(saved)
		fs.saveRangesLocked(n)
	}
	return st, err
}

// SetXattr sets the attribute name of ino (see memfs.Layer.SetXattr),
// copying it up first. Sealing a lower file copies up its metadata only.
func (fs *FS) SetXattr(ino uint64, name string, value []byte, flags int) error {
	n, err := fs.get(ino)
	if err != nil {
		return err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if err := fs.copyUpLocked(n); err != nil {
		return err
	}
	return fs.upper.SetXattr(n.upper, name, value, flags)
}

// RemoveXattr removes the attribute name of ino, copying it up first.
//
// Errors: ENODATA, EPERM.
func (fs *FS) RemoveXattr(ino uint64, name string) error {
	n, err := fs.get(ino)
	if err != nil {
		return err
	}
	fs.treeMu.Lock()
	defer fs.treeMu.Unlock()
	if n.upper == 0 && !lowerXattrVisible(name) {
		return syscall.EPERM
	}
	if err := fs.copyUpLocked(n); err != nil {
		return err
	}
	return fs.upper.RemoveXattr(n.upper, name)
}
