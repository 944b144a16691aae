package fusefs

import (
	"encoding/binary"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Attributes of files written through passthrough.
//
// A write(2) through passthrough has the kernel mark the FUSE inode's
// attributes stale; a store into a shared mapping does not, although
// tmpfs moves the backing file's change and modification times. With the
// hour-long attribute timeout, stat(2) would then show old times for an
// hour. So while an inode has writable passthrough opens (an inode nobody
// maps has them too, but the server cannot tell), the attributes the
// server reports for it carry a timeout of zero, and the kernel asks for
// them on each stat(2) and permission check; the first such open and the
// last one's RELEASE tell the kernel to forget the attributes it holds
// (FUSE_NOTIFY_INVAL_INODE), which were given for an hour. A file nobody
// writes costs one atomic load per reply; figures in BENCHMARKS.md
// ("Passthrough writers and attribute timeouts").
//
// Served by the daemon (no passthrough), every write, mapped or not,
// reaches memfs and its reply makes the kernel's attributes stale.

// notifyInvalInode is FUSE_NOTIFY_INVAL_INODE.
const notifyInvalInode = 2

// attrTimeout is how long the kernel may keep ino's attributes.
func (r *rawFS) attrTimeout(ino uint64) time.Duration {
	if r.writing.Load() == 0 {
		return cacheTimeout
	}
	r.writersMu.Lock()
	n := r.writers[ino]
	r.writersMu.Unlock()
	if n > 0 {
		return 0
	}
	return cacheTimeout
}

// writerOpened counts a writable passthrough open of ino; the first has
// the kernel forget ino's attributes.
func (r *rawFS) writerOpened(ino uint64) {
	r.writersMu.Lock()
	r.writers[ino]++
	first := r.writers[ino] == 1
	r.writersMu.Unlock()
	r.writing.Add(1)
	if first {
		r.dev.invalAttr(ino)
	}
}

// writerReleased uncounts a writable passthrough open of ino; the last
// has the kernel forget ino's attributes.
func (r *rawFS) writerReleased(ino uint64) {
	r.writersMu.Lock()
	r.writers[ino]--
	last := r.writers[ino] == 0
	if last {
		delete(r.writers, ino)
	}
	r.writersMu.Unlock()
	r.writing.Add(-1)
	if last {
		r.dev.invalAttr(ino)
	}
}

// isWriter says whether an open with open(2) flags, backed by passthrough,
// writes through passthrough.
func isWriter(flags uint32, backed bool) bool {
	return backed && flags&unix.O_ACCMODE != unix.O_RDONLY
}

// invalAttr tells the kernel to forget the attributes of node id ino
// (FUSE_NOTIFY_INVAL_INODE with a negative offset: no page is dropped).
// An inode the kernel does not hold (ENOENT) has none to forget.
func (s *session) invalAttr(ino uint64) {
	var msg [40]byte
	le := binary.LittleEndian
	le.PutUint32(msg[0:], uint32(len(msg)))
	le.PutUint32(msg[4:], notifyInvalInode)
	le.PutUint64(msg[16:], ino)
	le.PutUint64(msg[24:], ^uint64(0)) // offset -1
	if _, err := unix.Write(s.devFd, msg[:]); err != nil && err != syscall.ENOENT && err != syscall.ENODEV {
		klog.ErrorS(err, "Invalidating a file's attributes in the kernel", "fsName", s.raw.opts.FsName, "ino", ino)
	}
}
