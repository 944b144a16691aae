package memfs

import (
	"encoding/binary"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Dir is an open directory of a Layer. It holds a reference to its inode
// until Close. A Dir is not safe for concurrent use.
type Dir struct {
	l   *Layer
	ino uint64
	fd  int
	buf []byte
}

// OpenDir opens the directory ino for reading.
//
// Errors: ENOTDIR.
func (l *Layer) OpenDir(ino uint64) (vfs.Dir, error) {
	i, err := l.get(ino)
	if err != nil {
		return nil, err
	}
	if i.fileType != unix.S_IFDIR {
		return nil, syscall.ENOTDIR
	}
	fd, err := l.openInode(i, unix.O_RDONLY|unix.O_DIRECTORY)
	if err != nil {
		return nil, err
	}
	l.mu.Lock()
	i.refs++
	l.mu.Unlock()
	return &Dir{l: l, ino: ino, fd: fd, buf: make([]byte, 8192)}, nil
}

// ReadDir calls fn with the entries from offset off on ("." and ".."
// included) until fn returns false or the directory ends. The offsets are
// tmpfs's: they stay valid while the directory changes.
func (d *Dir) ReadDir(off int64, fn func(*vfs.DirEntry) bool) error {
	if _, err := unix.Seek(d.fd, off, 0); err != nil {
		return Errno(err)
	}
	var e vfs.DirEntry
	for {
		n, err := unix.Getdents(d.fd, d.buf)
		if err != nil {
			return Errno(err)
		}
		if n == 0 {
			return nil
		}
		for b := d.buf[:n]; len(b) > 0; {
			// struct linux_dirent64: ino u64, off s64, reclen u16, type u8, name.
			reclen := int(binary.NativeEndian.Uint16(b[16:]))
			e.Ino = binary.NativeEndian.Uint64(b[0:])
			e.Off = int64(binary.NativeEndian.Uint64(b[8:]))
			e.Type = b[18]
			name := b[19:reclen]
			for j, c := range name {
				if c == 0 {
					name = name[:j]
					break
				}
			}
			e.Name = string(name)
			if !fn(&e) {
				return nil
			}
			b = b[reclen:]
		}
	}
}

// Sync is fsync(2) of the directory.
func (d *Dir) Sync() error { return Errno(unix.Fsync(d.fd)) }

// Close closes the directory and drops its reference.
func (d *Dir) Close() error {
	err := unix.Close(d.fd)
	d.l.Forget(d.ino, 1)
	return Errno(err)
}
