package overlay

import (
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// smallFile is the size up to which a write open copies a partial file's
// bytes at once rather than page by page.
const smallFile = 64 << 10

// copyUpLocked makes n present in the upper layer: parents first, then a
// copy of n's metadata (mode, owner, times, xattrs; a device's number)
// built in WorkName and renamed into place, so that a failure leaves
// nothing behind. A regular file's bytes stay in the lower (the copy is
// partial); they are copied range by range as they are written, or whole
// when a small file is opened for writing.
//
// Preconditions:
//   - fs.treeMu is locked for writing.
func (fs *FS) copyUpLocked(n *node) error {
	if n.upper != 0 {
		return nil
	}
	p, name := fs.location(n)
	if p == nil {
		return syscall.ENOENT
	}
	if err := fs.copyUpLocked(p); err != nil {
		return err
	}
	st, err := fs.lower.Lstat(n.lowerPath)
	if err != nil {
		return err
	}
	tmp := fs.tmpName()
	e, partial, err := fs.buildCopy(n, &st, tmp)
	if err != nil {
		return err
	}
	fail := func(err error) error {
		fs.removeAll(fs.workIno, tmp)
		if n.indexed {
			fs.upper.Unlink(fs.workIno, indexName(n.ino))
			n.indexed = false
		}
		fs.upper.Forget(e.Ino(), 1)
		return err
	}
	if st.Mode&unix.S_IFMT == unix.S_IFREG && st.Nlink > 1 {
		if _, err := fs.upper.Link(e.Ino(), fs.workIno, indexName(n.ino)); err != nil {
			return fail(err)
		}
		fs.upper.Forget(e.Ino(), 1)
		n.indexed = true
		if err := fs.upper.SetMarker(e.Ino(), markerLinks, encodeLinks(uint64(st.Nlink), 1), 0); err != nil {
			return fail(err)
		}
	}
	if err := fs.placeLocked(p, tmp, name, vfs.RenameNoReplace); err != nil {
		return fail(err)
	}
	n.mu.Lock()
	n.upper = e.Ino()
	switch n.typ {
	case unix.S_IFDIR:
	case unix.S_IFREG:
		if partial {
			n.partial, n.limit, n.copied = true, st.Size, nil
		} else {
			n.hasLower = false
		}
	default:
		n.hasLower = false
	}
	n.mu.Unlock()
	return nil
}

// buildCopy makes in WorkName, as tmp, a copy of the lower entry of n with
// attributes st, and returns it with one memfs reference. partial says the
// bytes of a regular file were left in the lower.
func (fs *FS) buildCopy(n *node, st *unix.Stat_t, tmp string) (e vfs.Entry, partial bool, err error) {
	c := vfs.Caller{Uid: st.Uid, Gid: st.Gid}
	mode := st.Mode & 07777
	m := meta{ino: n.ino}
	switch st.Mode & unix.S_IFMT {
	case unix.S_IFDIR:
		e, err = fs.upper.Mkdir(fs.workIno, tmp, mode, c)
		m.hasLower, m.lowerPath = true, n.lowerPath
	case unix.S_IFREG:
		var f vfs.File
		e, f, err = fs.upper.Create(fs.workIno, tmp, unix.O_RDWR|unix.O_EXCL, mode, c, vfs.OpenOptions{})
		if err != nil {
			break
		}
		partial = st.Size > 0
		if partial {
			m.hasLower, m.lowerPath = true, n.lowerPath
			err = errnoOf(unix.Ftruncate(f.Fd(), st.Size))
			if err == nil {
				err = fs.upper.SetMarker(e.Ino(), markerRanges, encodeRanges(st.Size, nil), 0)
			}
		}
		f.Release()
	case unix.S_IFLNK:
		var target string
		if target, err = fs.lower.Readlink(n.lowerPath); err == nil {
			e, err = fs.upper.Symlink(fs.workIno, tmp, target, c)
		}
	case unix.S_IFIFO, unix.S_IFSOCK, unix.S_IFCHR, unix.S_IFBLK:
		e, err = fs.upper.Mknod(fs.workIno, tmp, st.Mode, st.Rdev, c)
	default:
		// No file type of Linux's.
		return vfs.Entry{}, false, syscall.EIO
	}
	if err != nil {
		if e.Ino() != 0 {
			fs.upper.Forget(e.Ino(), 1)
			fs.removeAll(fs.workIno, tmp)
		}
		return vfs.Entry{}, false, err
	}
	fail := func(err error) (vfs.Entry, bool, error) {
		fs.upper.Forget(e.Ino(), 1)
		fs.removeAll(fs.workIno, tmp)
		return vfs.Entry{}, false, err
	}
	if err := fs.copyXattrs(n.lowerPath, e.Ino()); err != nil {
		return fail(err)
	}
	if err := fs.upper.SetMarker(e.Ino(), markerOv, m.encode(), 0); err != nil {
		return fail(err)
	}
	a := vfs.SetAttr{
		Valid: vfs.SetAtime | vfs.SetMtime,
		Atime: st.Atim, Mtime: st.Mtim,
	}
	if st.Mode&unix.S_IFMT != unix.S_IFLNK {
		// Creating may have dropped set-ID bits.
		a.Valid |= vfs.SetMode
		a.Mode = mode
	}
	if _, err := fs.upper.SetAttr(e.Ino(), nil, a); err != nil {
		return fail(err)
	}
	return e, partial, nil
}

// copyXattrs copies the visible extended attributes of the lower path to
// the upper inode ino.
func (fs *FS) copyXattrs(path string, ino uint64) error {
	names, err := fs.lower.ListXattr(path)
	if err != nil {
		if err == syscall.EOPNOTSUPP {
			return nil
		}
		return err
	}
	for _, name := range names {
		if !lowerXattrVisible(name) {
			continue
		}
		v, err := fs.lower.GetXattr(path, name)
		if err == syscall.ENODATA {
			continue
		}
		if err != nil {
			return err
		}
		if err := fs.upper.SetXattr(ino, name, v, 0); err != nil {
			return err
		}
	}
	return nil
}

// placeLocked renames the entry tmp of WorkName to name in the upper
// directory of p, with the rename flags, keeping p's times as they were and
// marking p as holding entries with markers.
//
// Preconditions:
//   - fs.treeMu is locked for writing; p.upper != 0.
func (fs *FS) placeLocked(p *node, tmp, name string, flags uint32) error {
	return fs.keepTimes(p.upper, func() error {
		if err := fs.setMixed(p); err != nil {
			return err
		}
		return fs.upper.Rename(fs.workIno, tmp, p.upper, name, flags)
	})
}

// keepTimes runs fn, which changes the upper directory dir on the FS's own
// behalf, and restores dir's access and modification times.
func (fs *FS) keepTimes(dir uint64, fn func() error) error {
	st, err := fs.upper.GetAttr(dir)
	if err != nil {
		return err
	}
	if err := fn(); err != nil {
		return err
	}
	_, err = fs.upper.SetAttr(dir, nil, vfs.SetAttr{
		Valid: vfs.SetAtime | vfs.SetMtime,
		Atime: st.Atim, Mtime: st.Mtim,
	})
	return err
}

// encodeLinks encodes the "links" marker of an index entry.
func encodeLinks(lowerNlink uint64, placed uint64) []byte {
	return []byte(strconv.FormatUint(lowerNlink, 10) + " " + strconv.FormatUint(placed, 10))
}

// readLinks reads the "links" marker of the upper inode ino.
func (fs *FS) readLinks(ino uint64) (lowerNlink, placed uint64, err error) {
	var buf [64]byte
	n, err := fs.upper.GetMarker(ino, markerLinks, buf[:])
	if err != nil {
		return 0, 0, err
	}
	a, b, _ := strings.Cut(string(buf[:n]), " ")
	lowerNlink, err1 := strconv.ParseUint(a, 10, 64)
	placed, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil {
		return 0, 0, syscall.EIO
	}
	return lowerNlink, placed, nil
}

// isIndexed says whether the overlay inode ino has an index entry.
func (fs *FS) isIndexed(ino uint64) bool {
	e, err := fs.upper.Lookup(fs.workIno, indexName(ino))
	if err != nil {
		return false
	}
	fs.upper.Forget(e.Ino(), 1)
	return true
}

// linkDelta returns what to add to the upper link count of the indexed
// node n to get the overlay's: the lower names not yet placed, less the
// index entry itself.
//
// Preconditions:
//   - fs.treeMu is locked; n.indexed.
func (fs *FS) linkDelta(n *node) int64 {
	lowerNlink, placed, err := fs.readLinks(n.upper)
	if err != nil {
		return 0
	}
	return int64(lowerNlink) - int64(placed) - 1
}

// placeIndexedLocked links the index entry of the lower inode lowerIno, if
// there is one, into p as name, where the lower has another name of it,
// and returns its node with a reference. It returns nil if the inode is
// not indexed.
//
// Preconditions:
//   - fs.treeMu is locked, for writing if write is true (else the result
//     may be errNeedWrite).
func (fs *FS) placeIndexedLocked(p *node, name string, lowerIno uint64, write bool) (*node, error) {
	idx := indexName(lowerOvIno(lowerIno))
	ie, err := fs.upper.Lookup(fs.workIno, idx)
	if err == syscall.ENOENT {
		return nil, nil
	}
	if err != nil {
		return nil, err
	}
	defer fs.upper.Forget(ie.Ino(), 1)
	if !write {
		return nil, errNeedWrite
	}
	if err := fs.copyUpLocked(p); err != nil {
		return nil, err
	}
	lowerNlink, placed, err := fs.readLinks(ie.Ino())
	if err != nil {
		return nil, err
	}
	var e vfs.Entry
	err = fs.keepTimes(p.upper, func() error {
		if err := fs.setMixed(p); err != nil {
			return err
		}
		var err error
		e, err = fs.upper.Link(ie.Ino(), p.upper, name)
		return err
	})
	if err != nil {
		return nil, err
	}
	if err := fs.upper.SetMarker(ie.Ino(), markerLinks, encodeLinks(lowerNlink, placed+1), 0); err != nil {
		fs.upper.Unlink(p.upper, name)
		fs.upper.Forget(e.Ino(), 1)
		return nil, err
	}
	return fs.upperNode(p, name, e)
}

// indexName is the name in the hard-link index of the lower file whose
// overlay inode number is ino.
func indexName(ino uint64) string {
	return "i" + strconv.FormatUint(ino, 16)
}
