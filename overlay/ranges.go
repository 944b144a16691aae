package overlay

import (
	"strconv"
	"strings"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// rng is the byte range [start, end).
type rng struct{ start, end int64 }

// rangeSet is a set of bytes as sorted, disjoint, non-adjacent ranges.
type rangeSet []rng

// add adds [a, b) to s.
func (s rangeSet) add(a, b int64) rangeSet {
	if a >= b {
		return s
	}
	out := make(rangeSet, 0, len(s)+1)
	i := 0
	for ; i < len(s) && s[i].end < a; i++ {
		out = append(out, s[i])
	}
	for ; i < len(s) && s[i].start <= b; i++ {
		a, b = min(a, s[i].start), max(b, s[i].end)
	}
	out = append(out, rng{a, b})
	return append(out, s[i:]...)
}

// gaps returns the parts of [a, b) not in s.
func (s rangeSet) gaps(a, b int64) []rng {
	var out []rng
	for _, r := range s {
		if a >= b {
			break
		}
		if r.end <= a {
			continue
		}
		if r.start >= b {
			break
		}
		if r.start > a {
			out = append(out, rng{a, r.start})
		}
		a = r.end
	}
	if a < b {
		out = append(out, rng{a, b})
	}
	return out
}

// clip removes everything at or beyond limit.
func (s rangeSet) clip(limit int64) rangeSet {
	out := s[:0:0]
	for _, r := range s {
		if r.start >= limit {
			break
		}
		out = append(out, rng{r.start, min(r.end, limit)})
	}
	return out
}

func encodeRanges(limit int64, s rangeSet) []byte {
	var b strings.Builder
	b.WriteString(strconv.FormatInt(limit, 10))
	for _, r := range s {
		b.WriteByte(' ')
		b.WriteString(strconv.FormatInt(r.start, 10))
		b.WriteByte('-')
		b.WriteString(strconv.FormatInt(r.end, 10))
	}
	return []byte(b.String())
}

func decodeRanges(b []byte) (int64, rangeSet, error) {
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0, nil, syscall.EIO
	}
	limit, err := strconv.ParseInt(f[0], 10, 64)
	if err != nil {
		return 0, nil, syscall.EIO
	}
	var s rangeSet
	for _, w := range f[1:] {
		as, bs, ok := strings.Cut(w, "-")
		a, err1 := strconv.ParseInt(as, 10, 64)
		e, err2 := strconv.ParseInt(bs, 10, 64)
		if !ok || err1 != nil || err2 != nil || a >= e || (len(s) > 0 && a <= s[len(s)-1].end) {
			return 0, nil, syscall.EIO
		}
		s = append(s, rng{a, e})
	}
	return limit, s, nil
}

// readRanges reads the "ranges" marker of the upper file ino; ok is false
// when there is none (the file is whole in the upper).
func (fs *FS) readRanges(ino uint64) (limit int64, s rangeSet, ok bool, err error) {
	buf := make([]byte, maxMarker)
	n, err := fs.upper.GetMarker(ino, markerRanges, buf)
	switch err {
	case nil:
		limit, s, err = decodeRanges(buf[:n])
		return limit, s, err == nil, err
	case syscall.ENODATA:
		return 0, nil, false, nil
	}
	return 0, nil, false, err
}

// maxRanges bounds the ranges kept for a partial file; past it the file is
// copied up whole, so the marker stays small.
const maxRanges = 2048

// wholeLocked says whether n's upper copy holds every byte.
//
// Preconditions:
//   - n.mu is locked; n.partial.
func (n *node) wholeLocked() bool {
	return len(n.copied.gaps(0, n.limit)) == 0
}

// saveRangesLocked records n's copied ranges in the upper file, or, if the
// file is now whole, removes the record and drops the lower.
//
// Preconditions:
//   - n.mu is locked; n.partial.
func (fs *FS) saveRangesLocked(n *node) error {
	if n.wholeLocked() {
		err := fs.upper.RemoveMarker(n.upper, markerRanges)
		if err != nil && err != syscall.ENODATA {
			return err
		}
		n.partial, n.hasLower, n.copied, n.limit = false, false, nil, 0
		return nil
	}
	return fs.upper.SetMarker(n.upper, markerRanges, encodeRanges(n.limit, n.copied), 0)
}

// copyInLocked copies the bytes of [a, b) that are still only in the lower
// into the upper file open as ufd, from the lower file lf, and records them.
//
// Preconditions:
//   - n.mu is locked; n.partial.
func (fs *FS) copyInLocked(n *node, ufd int, lf LowerFile, a, b int64) error {
	b = min(b, n.limit)
	gaps := n.copied.gaps(a, b)
	if len(gaps) == 0 {
		return nil
	}
	if len(n.copied)+len(gaps) > maxRanges {
		// Too fragmented: copy the rest of the file.
		gaps = n.copied.gaps(0, n.limit)
	}
	buf := make([]byte, min(1<<20, gaps[len(gaps)-1].end-gaps[0].start))
	var copied int64
	defer func() { fs.addCopied(copied) }()
	for _, g := range gaps {
		for off := g.start; off < g.end; {
			chunk := buf[:min(int64(len(buf)), g.end-off)]
			rn, err := lf.ReadAt(chunk, off)
			if err != nil {
				return err
			}
			if rn == 0 {
				break // the lower file ends early: the rest reads as zeros
			}
			if err := pwriteAll(ufd, chunk[:rn], off); err != nil {
				return err
			}
			copied += int64(rn)
			off += int64(rn)
		}
	}
	prev := n.copied
	for _, g := range gaps {
		n.copied = n.copied.add(g.start, g.end)
	}
	if err := fs.saveRangesLocked(n); err != nil {
		if n.partial {
			n.copied = prev
		}
		return err
	}
	return nil
}

func pwriteAll(fd int, p []byte, off int64) error {
	for len(p) > 0 {
		n, err := unix.Pwrite(fd, p, off)
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return errnoOf(err)
		}
		p, off = p[n:], off+int64(n)
	}
	return nil
}

// readPartialLocked reads a partial file at off: bytes below the limit not
// yet copied come from the lower file lf, the rest from the upper file uf.
//
// Preconditions:
//   - n.mu is locked; n.partial.
func (fs *FS) readPartialLocked(n *node, uf vfs.File, lf LowerFile, p []byte, off int64) (int, error) {
	st, err := uf.Stat()
	if err != nil {
		return 0, err
	}
	if off >= st.Size {
		return 0, nil
	}
	p = p[:min(int64(len(p)), st.Size-off)]
	end := off + int64(len(p))
	fromLower := n.copied.gaps(off, min(end, n.limit))
	pos := off
	read := func(a, b int64, lower bool) error {
		buf := p[a-off : b-off]
		var got int
		var err error
		if lower {
			got, err = lf.ReadAt(buf, a)
		} else {
			got, err = uf.ReadAt(buf, a)
		}
		if err != nil {
			return err
		}
		clear(buf[got:])
		return nil
	}
	for _, g := range fromLower {
		if pos < g.start {
			if err := read(pos, g.start, false); err != nil {
				return 0, err
			}
		}
		if err := read(g.start, g.end, true); err != nil {
			return 0, err
		}
		pos = g.end
	}
	if pos < end {
		if err := read(pos, end, false); err != nil {
			return 0, err
		}
	}
	return len(p), nil
}
