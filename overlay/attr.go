package overlay

import (
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// GetAttr returns the attributes of ino.
func (fs *FS) GetAttr(ino uint64) (unix.Stat_t, error) {
	n, err := fs.get(ino)
	if err != nil {
		return unix.Stat_t{}, err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	return fs.statLocked(n)
}

// statLocked returns n's attributes as the overlay shows them.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) statLocked(n *node) (unix.Stat_t, error) {
	var st unix.Stat_t
	var err error
	if n.upper != 0 {
		st, err = fs.upper.GetAttr(n.upper)
	} else {
		st, err = fs.lower.Lstat(n.lowerPath)
	}
	if err != nil {
		return st, err
	}
	return st, fs.fixStatLocked(n, &st)
}

// fixStatLocked turns the attributes of n's top layer into the overlay's:
// its inode number, the link counts of merged directories and of indexed
// hard links, and the blocks of a partly copied-up file.
//
// Preconditions:
//   - fs.treeMu is locked; n.mu is not.
func (fs *FS) fixStatLocked(n *node, st *unix.Stat_t) error {
	st.Ino = n.ino
	if n.typ == unix.S_IFREG && n.upper != 0 && n.hasLower {
		st.Blocks += fs.lowerBlocks(n)
	}
	switch {
	case n.typ == unix.S_IFDIR && n.upper != 0 && n.hasLower:
		subdirs, err := fs.subdirsLocked(n)
		if err != nil {
			return err
		}
		setNlink(&st.Nlink, uint64(2+subdirs))
	case n == fs.root:
		st.Nlink-- // WorkName
	case n.indexed && n.upper != 0:
		setNlink(&st.Nlink, uint64(int64(st.Nlink)+fs.linkDelta(n)))
	}
	return nil
}

// subdirsLocked returns the number of subdirectories the merged
// directory n shows: the kept count, or a merge's.
//
// Preconditions:
//   - fs.treeMu is locked; n.mu is not.
func (fs *FS) subdirsLocked(n *node) (int, error) {
	n.mu.Lock()
	subdirs, known := n.subdirs, n.subdirsKnown
	n.mu.Unlock()
	if known {
		return subdirs, nil
	}
	subdirs, err := fs.countSubdirsLocked(n)
	if err != nil {
		return 0, err
	}
	// Writers hold fs.treeMu for writing: no change came in between.
	n.mu.Lock()
	n.subdirs, n.subdirsKnown = subdirs, true
	n.mu.Unlock()
	return subdirs, nil
}

// countSubdirsLocked counts the subdirectories the directory n shows, by
// a merge.
//
// Preconditions:
//   - fs.treeMu is locked.
func (fs *FS) countSubdirsLocked(n *node) (int, error) {
	ents, err := fs.mergedEntriesLocked(n)
	if err != nil {
		return 0, err
	}
	subdirs := 0
	for _, e := range ents {
		if e.Type == unix.DT_DIR {
			subdirs++
		}
	}
	return subdirs, nil
}

// lowerBlocks returns the 512-byte blocks of n's bytes that still live only
// in the lower, or 0 if n is not partial. The upper copy of a partial file
// is sparse where it was not copied, so its own st_blocks leaves them out:
// a file whose metadata alone was copied up (chmod) would show 0 blocks,
// which tools take for "all holes" (tar --sparse archives it as zeros).
// The count is the lower file's blocks, capped by the pages not copied.
//
// Preconditions:
//   - fs.treeMu is locked; n.mu is not.
func (fs *FS) lowerBlocks(n *node) int64 {
	n.mu.Lock()
	var missing int64
	if n.partial {
		for _, g := range n.copied.gaps(0, n.limit) {
			missing += g.end - g.start
		}
	}
	n.mu.Unlock()
	if missing == 0 {
		return 0
	}
	lst, err := fs.lower.Lstat(n.lowerPath)
	if err != nil {
		// The lower is read-only and outlives its nodes; if it cannot be
		// read, reads fail too. Blocks are advisory: report the upper's.
		return 0
	}
	const pageBlocks = 4096 / 512
	return min(lst.Blocks, (missing+4095)/4096*pageBlocks)
}

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

// setNlink sets a link count: unix.Stat_t.Nlink is a uint64 on amd64 and
// a uint32 on arm64.
func setNlink[T uint32 | uint64](p *T, v uint64) { *p = T(v) }

// BirthTime returns the creation time of ino's upper inode: when it was
// created in the overlay or copied up. ok is false for a node still wholly
// in the lower layer, whose image records no birth time.
func (fs *FS) BirthTime(ino uint64) (unix.Timespec, bool, error) {
	n, err := fs.get(ino)
	if err != nil {
		return unix.Timespec{}, false, err
	}
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	if n.upper == 0 {
		return unix.Timespec{}, false, nil
	}
	return fs.upper.BirthTime(n.upper)
}
