package overlay

import (
	"strings"
	"syscall"

	"github.com/csi-memfs/csi-memfs/memfs"
)

// aclDefault names a directory's default POSIX ACL, which entries made
// in it inherit.
const aclDefault = "system.posix_acl_default"

// lowerXattrVisible says whether the lower attribute name is shown (and
// copied up): all but memfs's internal names. POSIX ACLs are, as on
// Linux's overlayfs: shown, enforced, and copied up with the file.
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
