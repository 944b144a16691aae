package volume

import (
	"github.com/csi-memfs/csi-memfs/memfs"
)

// Usage is what a volume's memory layer uses and may use, as the tmpfs
// instance counts it (the numbers df shows in the pod), and how much of it
// was copied up from the lower directory.
type Usage struct {
	BytesUsed, BytesLimit   uint64
	InodesUsed, InodesLimit uint64
	// CopiedUpBytes counts the bytes ever copied up from the lower
	// directory; the rest of BytesUsed was written by users. 0 for a
	// pure memory volume.
	CopiedUpBytes uint64
	// MetaBytes is the part of BytesUsed charged for inodes and
	// extended attributes (memfs.Usage.MetaBytes).
	MetaBytes uint64
}

// Usage reports the volume's usage. It must not be called after Close or
// Stop.
func (v *Volume) Usage() (Usage, error) {
	if v.ov != nil {
		ou, err := v.ov.Usage()
		if err != nil {
			return Usage{}, err
		}
		u := ou.Usage
		return Usage{BytesUsed: u.BytesUsed, BytesLimit: u.BytesLimit, InodesUsed: u.InodesUsed, InodesLimit: u.InodesLimit,
			CopiedUpBytes: ou.CopiedUpBytes, MetaBytes: u.MetaBytes}, nil
	}
	u, err := v.layer.Usage()
	if err != nil {
		return Usage{}, err
	}
	return Usage{BytesUsed: u.BytesUsed, BytesLimit: u.BytesLimit, InodesUsed: u.InodesUsed, InodesLimit: u.InodesLimit,
		MetaBytes: u.MetaBytes}, nil
}

// UpperUsage measures a memory layer that no Volume serves, mounted on dir
// (one a previous process left); see memfs.MountedUsage.
func UpperUsage(dir string) (Usage, error) {
	u, err := memfs.MountedUsage(dir)
	if err != nil {
		return Usage{}, err
	}
	return Usage{BytesUsed: u.BytesUsed, BytesLimit: u.BytesLimit, InodesUsed: u.InodesUsed, InodesLimit: u.InodesLimit,
		MetaBytes: u.MetaBytes}, nil
}
