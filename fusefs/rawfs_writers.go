package fusefs

import (
	"encoding/binary"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
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
// (FUSE_NOTIFY_INVAL_INODE), which were given for an hour. A reply costs
// one atomic load and, while any file has writers, a lookup in a map
// replaced on each writable open and release; figures in BENCHMARKS.md
// ("Passthrough writers and attribute timeouts").
//
// Served by the daemon (no passthrough), every write, mapped or not,
// reaches memfs and its reply makes the kernel's attributes stale.

// notifyInvalInode is FUSE_NOTIFY_INVAL_INODE.
const notifyInvalInode = 2

// attrTimeout is how long the kernel may keep ino's attributes.
func (r *rawFS) attrTimeout(ino uint64) time.Duration {
	if m := r.writers.Load(); m != nil && (*m)[ino] > 0 {
		return 0
	}
	return cacheTimeout
}

// addWriter adds d to ino's count of writable passthrough opens and
// returns the new count. Writable opens are rare next to replies, so the
// map is copied on change.
func (r *rawFS) addWriter(ino uint64, d int) int {
	r.writersMu.Lock()
	defer r.writersMu.Unlock()
	m := map[uint64]int{}
	if old := r.writers.Load(); old != nil {
		for k, v := range *old {
			m[k] = v
		}
	}
	n := m[ino] + d
	if n > 0 {
		m[ino] = n
	} else {
		delete(m, ino)
	}
	if len(m) == 0 {
		r.writers.Store(nil)
	} else {
		r.writers.Store(&m)
	}
	return n
}

// writerOpened counts a writable passthrough open of ino; the first has
// the kernel forget ino's attributes, unless inval is false: a CREATE's
// reply replaces them itself, with the writer's zero timeout (and for a
// new inode, the kernel's usual case, the notice would only fail with
// ENOENT, a write to /dev/fuse per create).
func (r *rawFS) writerOpened(ino uint64, inval bool) {
	if r.addWriter(ino, 1) == 1 && inval {
		r.stale.add(ino)
		r.dev.invalAttr(ino)
	}
}

// writerReleased uncounts a writable passthrough open of ino; the last
// has the kernel forget ino's attributes.
func (r *rawFS) writerReleased(ino uint64) {
	if r.addWriter(ino, -1) == 0 {
		r.stale.add(ino)
		r.dev.invalAttr(ino)
	}
}

// createdEmpty gives the attributes of a CREATE or TMPFILE reply the
// hour-long timeout when the file is empty and has no other name, although
// its writer is open: what the timeout of zero guards against, a store
// into a shared mapping, cannot happen before something makes the file
// longer (a store beyond the end of a file is SIGBUS), and each way to do
// that either is a request whose reply carries the writer's zero timeout
// (SETATTR, FALLOCATE, COPY_FILE_RANGE) or a passthrough write(2), after
// which the kernel marks the size and times stale itself. It spares the
// GETATTR that the open's permission check would send right after the
// reply: one request in five of a create, one in ten of an untar.
func createdEmpty(out *fuse.EntryOut, st *unix.Stat_t, nlink uint64) {
	if st.Size == 0 && uint64(st.Nlink) == nlink {
		out.SetAttrTimeout(cacheTimeout)
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
