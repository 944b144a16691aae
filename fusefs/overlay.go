package fusefs

import (
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
)

// FromOverlay serves an overlay of a memfs upper over a lower tree.
func FromOverlay(fs *overlay.FS) FileSystem { return overlayFS{fs} }

// overlayFS adapts *overlay.FS's concrete File and Dir types to the
// interfaces.
type overlayFS struct{ *overlay.FS }

func (o overlayFS) SetAttr(ino uint64, f File, a memfs.SetAttr) (unix.Stat_t, error) {
	of, _ := f.(*overlay.File)
	return o.FS.SetAttr(ino, of, a)
}

func (o overlayFS) Create(parent uint64, name string, flags int, mode uint32, c memfs.Caller, opts memfs.OpenOptions) (memfs.Entry, File, error) {
	e, f, err := o.FS.Create(parent, name, flags, mode, c, opts)
	if err != nil {
		return e, nil, err
	}
	return e, f, nil
}

func (o overlayFS) Open(ino uint64, flags int, opts memfs.OpenOptions) (File, error) {
	f, err := o.FS.Open(ino, flags, opts)
	if err != nil {
		return nil, err
	}
	return f, nil
}

func (o overlayFS) OpenDir(ino uint64) (Dir, error) {
	d, err := o.FS.OpenDir(ino)
	if err != nil {
		return nil, err
	}
	return d, nil
}

func (o overlayFS) Tmpfile(parent uint64, flags int, mode uint32, c memfs.Caller, opts memfs.OpenOptions) (memfs.Entry, File, error) {
	e, f, err := o.FS.Tmpfile(parent, flags, mode, c, opts)
	if err != nil {
		return e, nil, err
	}
	return e, f, nil
}
