package volume

import (
	"fmt"
	"path"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// Operations on a volume's tree that Build runs before it is served.

// SealError is Build's error when a file Config.Seal matches cannot be
// sealed. Err names the file (relative to the root) and wraps the errno:
// EPERM or EBUSY from the file itself (one the lower directory made
// unsealable), or another failure of the walk.
type SealError struct {
	Err error
}

func (e *SealError) Error() string { return "seal: " + e.Err.Error() }

func (e *SealError) Unwrap() error { return e.Err }

// initRoot sets the root directory's owner group and mode (see
// Config.SharedRoot).
func (v *Volume) initRoot() error {
	a := vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o777}
	if g := v.cfg.MountGroup; g != nil {
		a = vfs.SetAttr{Valid: vfs.SetGid | vfs.SetMode, Gid: *g, Mode: 0o2775}
	}
	_, err := v.tree().SetAttr(vfs.RootIno, nil, a)
	return err
}

// allSeals is the value of the seals xattr that seals a file completely.
var allSeals = []byte("write,grow,shrink,seal")

// sealMatching seals every regular file of the tree whose path (relative
// to the root, slash-separated) matches one of Config.Seal. A file with
// several names (hard links) is sealed once: sealed completely, it
// refuses any further seal.
func (v *Volume) sealMatching() error {
	globs := v.cfg.Seal
	if len(globs) == 0 {
		return nil
	}
	tree := v.tree()
	sealed := map[uint64]bool{}
	var walk func(dir uint64, rel string) error
	walk = func(dir uint64, rel string) error {
		type child struct {
			name string
			typ  uint8
		}
		var children []child
		h, err := tree.OpenDir(dir)
		if err != nil {
			return err
		}
		err = h.ReadDir(0, func(e *vfs.DirEntry) bool {
			if e.Name != "." && e.Name != ".." {
				children = append(children, child{e.Name, e.Type})
			}
			return true
		})
		h.Close()
		if err != nil {
			return err
		}
		for _, c := range children {
			if c.typ != unix.DT_DIR && c.typ != unix.DT_REG {
				continue
			}
			p := path.Join(rel, c.name)
			e, err := tree.Lookup(dir, c.name)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			ino := e.Ino()
			if c.typ == unix.DT_DIR {
				err = walk(ino, p)
			} else if matchAny(globs, p) && !sealed[ino] {
				if err = tree.SetXattr(ino, memfs.SealsXattr, allSeals, 0); err != nil {
					err = fmt.Errorf("%s: %w", p, err)
				}
				sealed[ino] = err == nil
			}
			tree.Forget(ino, 1)
			if err != nil {
				return err
			}
		}
		return nil
	}
	return walk(vfs.RootIno, "")
}

// matchAny says whether name matches one of globs (path.Match).
func matchAny(globs []string, name string) bool {
	for _, g := range globs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}
