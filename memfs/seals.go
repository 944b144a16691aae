package memfs

import (
	"strings"
	"syscall"

	"golang.org/x/sys/unix"
)

// Seals are memfd-style seals on a regular file (fcntl(2) F_ADD_SEALS).
// Once added they are never removed.
type Seals uint32

// The seals, with Linux's values.
const (
	// SealSeal forbids adding further seals.
	SealSeal Seals = unix.F_SEAL_SEAL
	// SealShrink forbids reducing the file's size.
	SealShrink Seals = unix.F_SEAL_SHRINK
	// SealGrow forbids increasing the file's size. A write that would grow
	// the file writes up to the start of the page holding the end of file,
	// as Linux's tmpfs does, and fails with EPERM if that is nothing.
	SealGrow Seals = unix.F_SEAL_GROW
	// SealWrite forbids changing the file's contents; it cannot be added
	// while the file is open for writing (EBUSY), and write opens of a
	// write-sealed file fail with EPERM.
	SealWrite Seals = unix.F_SEAL_WRITE

	allSeals = SealSeal | SealShrink | SealGrow | SealWrite
)

// sealNames lists the seals in the order String writes them.
var sealNames = []struct {
	s    Seals
	name string
}{{SealWrite, "write"}, {SealGrow, "grow"}, {SealShrink, "shrink"}, {SealSeal, "seal"}}

// String returns the seals as a comma-separated list, e.g. "grow,shrink".
func (s Seals) String() string {
	var b strings.Builder
	for _, n := range sealNames {
		if s&n.s != 0 {
			if b.Len() > 0 {
				b.WriteByte(',')
			}
			b.WriteString(n.name)
		}
	}
	return b.String()
}

// ParseSeals parses a comma-separated list of seal names (write, grow,
// shrink, seal). Spaces around names are ignored; an unknown name is
// EINVAL.
func ParseSeals(text string) (Seals, error) {
	var s Seals
	for _, word := range strings.Split(text, ",") {
		word = strings.TrimSpace(word)
		if word == "" {
			continue
		}
		found := false
		for _, n := range sealNames {
			if n.name == word {
				s |= n.s
				found = true
			}
		}
		if !found {
			return 0, syscall.EINVAL
		}
	}
	return s, nil
}

// sealsMarker is the marker holding a file's seals.
const sealsMarker = "seals"

// Seals returns the seals of the regular file ino.
//
// Errors: EINVAL (not a regular file).
func (l *Layer) Seals(ino uint64) (Seals, error) {
	i, err := l.get(ino)
	if err != nil {
		return 0, err
	}
	if i.fileType != unix.S_IFREG {
		return 0, syscall.EINVAL
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	return l.sealsLocked(i)
}

// sealsLocked returns i's seals, loading them from the marker once.
//
// Preconditions:
//   - i.mu is locked.
func (l *Layer) sealsLocked(i *inode) (Seals, error) {
	if i.sealsLoaded || i.fileType != unix.S_IFREG {
		return i.seals, nil
	}
	var buf [32]byte
	n, err := l.getMarker(i, sealsMarker, buf[:])
	switch err {
	case nil:
		s, err := ParseSeals(string(buf[:n]))
		if err != nil {
			return 0, syscall.EIO
		}
		i.seals = s
	case syscall.ENODATA:
		i.seals = 0
	default:
		return 0, err
	}
	i.sealsLoaded = true
	return i.seals, nil
}

// AddSeals adds seals to the regular file ino: all of them or, on error,
// none.
//
// Errors: EINVAL (not a regular file, or unknown bits), EPERM (the file is
// sealed with SealSeal), EBUSY (adding SealWrite while the file is open for
// writing, or SealGrow while a writer's bytes bypass memfs, which could
// then grow the file unchecked).
func (l *Layer) AddSeals(ino uint64, add Seals) error {
	if add&^allSeals != 0 {
		return syscall.EINVAL
	}
	i, err := l.get(ino)
	if err != nil {
		return err
	}
	if i.fileType != unix.S_IFREG {
		return syscall.EINVAL
	}
	i.mu.Lock()
	defer i.mu.Unlock()
	cur, err := l.sealsLocked(i)
	if err != nil {
		return err
	}
	if cur&SealSeal != 0 {
		return l.sealDenied()
	}
	if add&^cur&SealWrite != 0 && i.writers > 0 {
		return syscall.EBUSY
	}
	if add&^cur&SealGrow != 0 && i.directWriters > 0 {
		return syscall.EBUSY
	}
	next := cur | add
	if next == cur {
		return nil
	}
	if err := l.setMarker(i, sealsMarker, []byte(next.String()), 0); err != nil {
		return err
	}
	i.seals = next
	return nil
}
