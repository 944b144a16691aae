package overlay

import (
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// mergedEntriesLocked returns the entries the directory n shows: its upper
// entries that are not whiteouts, then its lower entries that are neither in
// the upper nor whited out. "." and ".." are not included.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) mergedEntriesLocked(n *node) ([]vfs.DirEntry, error) {
	var out []vfs.DirEntry
	var seen map[string]bool
	if n.upper != 0 {
		d, err := fs.upper.OpenDir(n.upper)
		if err != nil {
			return nil, err
		}
		err = d.ReadDir(0, func(e *vfs.DirEntry) bool {
			if e.Name == "." || e.Name == ".." || (n == fs.root && e.Name == WorkName) {
				return true
			}
			out = append(out, vfs.DirEntry{Ino: e.Ino, Type: e.Type, Name: e.Name})
			return true
		})
		d.Close()
		if err != nil {
			return nil, err
		}
		if n.mixed || fs.isMixed(n.upper) {
			kept := out[:0]
			for _, e := range out {
				if e.Ino == fs.whiteoutIno {
					// A link of the shared whiteout: no marker to read.
					if seen == nil {
						seen = map[string]bool{}
					}
					seen[e.Name] = true
					continue
				}
				m, err := fs.readMetaAt(n.upper, e.Name)
				if err == syscall.ENOENT {
					continue // removed meanwhile
				}
				if err != nil {
					return nil, err
				}
				if m.whiteout {
					if seen == nil {
						seen = map[string]bool{}
					}
					seen[e.Name] = true
					continue
				}
				if m.ino != 0 {
					e.Ino = m.ino
				}
				kept = append(kept, e)
			}
			out = kept
		}
	}
	if !n.hasLower {
		return out, nil
	}
	lents, err := fs.lower.ReadDir(n.lowerPath)
	if err != nil {
		return nil, err
	}
	if len(out) > 0 && seen == nil {
		seen = make(map[string]bool, len(out))
	}
	for _, e := range out {
		seen[e.Name] = true
	}
	for _, le := range lents {
		if seen[le.Name] || (n == fs.root && le.Name == WorkName) {
			continue
		}
		out = append(out, vfs.DirEntry{Ino: lowerOvIno(le.Ino), Type: le.Type, Name: le.Name})
	}
	return out, nil
}

// Dir is an open directory of an overlay. It reads the merged entries once
// when read from offset 0 and serves offsets into that snapshot, so
// offsets stay valid while the directory changes (entries added or removed
// after the snapshot may or may not show, as POSIX allows). A Dir is not
// safe for concurrent use.
type Dir struct {
	fs *FS
	n  *node
	// ents is the snapshot, "." and ".." first; nil before the first read.
	ents []vfs.DirEntry
}

// OpenDir opens the directory ino for reading.
//
// Errors: ENOTDIR.
func (fs *FS) OpenDir(ino uint64) (vfs.Dir, error) {
	n, err := fs.get(ino)
	if err != nil {
		return nil, err
	}
	if n.typ != unix.S_IFDIR {
		return nil, syscall.ENOTDIR
	}
	fs.ref(n)
	return &Dir{fs: fs, n: n}, nil
}

// ReadDir calls fn with the entries from offset off on ("." and ".."
// included) until fn returns false or the directory ends. Offset 0 takes a
// fresh snapshot.
func (d *Dir) ReadDir(off int64, fn func(*vfs.DirEntry) bool) error {
	if off == 0 || d.ents == nil {
		fs := d.fs
		fs.treeMu.RLock()
		ents, err := fs.mergedEntriesLocked(d.n)
		parent, _ := fs.location(d.n)
		fs.treeMu.RUnlock()
		if err != nil {
			return err
		}
		pino := d.n.ino
		if parent != nil {
			pino = parent.ino
		}
		d.ents = append([]vfs.DirEntry{
			{Ino: d.n.ino, Type: unix.DT_DIR, Name: "."},
			{Ino: pino, Type: unix.DT_DIR, Name: ".."},
		}, ents...)
	}
	if off < 0 {
		return syscall.EINVAL
	}
	for i := off; i < int64(len(d.ents)); i++ {
		e := d.ents[i]
		e.Off = i + 1
		if !fn(&e) {
			return nil
		}
	}
	return nil
}

// Sync is fsync(2) of the directory; nothing to do, the upper is memory.
func (d *Dir) Sync() error { return nil }

// Close drops the Dir's reference.
func (d *Dir) Close() error {
	d.fs.unref(d.n, 1)
	return nil
}
