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
// A write(2) through passthrough (splice and asynchronous writes too) has
// the kernel mark the FUSE inode's size and times stale itself
// (fuse_passthrough_end_write); a store into a shared mapping does not,
// although tmpfs moves the backing file's change and modification times.
// With the hour-long attribute timeout, stat(2) would then show old times
// for an hour. Only a read-write open can be mapped shared and writable
// (mmap(2) wants a descriptor open for reading, and mprotect(2) cannot
// add write access to a shared mapping of a read-only one), so while an
// inode has read-write passthrough opens (an inode nobody maps has them
// too, but the server cannot tell), the attributes the server reports for
// it carry a timeout of zero, and the kernel asks for them on each
// stat(2) and permission check; the first such open and the last one's
// RELEASE tell the kernel to forget the attributes it holds
// (FUSE_NOTIFY_INVAL_INODE), which were given for an hour. Write-only
// opens, what tar, cp and most writers use, keep the hour: the kernel
// sees each of their changes, so an untarred file's attributes, refreshed
// by its last SETATTR, stay cached past its close. A reply costs one
// atomic load and, while any file has read-write opens, a lookup in a map
// replaced on each such open and release; figures in BENCHMARKS.md
// ("Passthrough writers and attribute timeouts", "Session 11").
//
// Served by the daemon (no passthrough), every write, mapped or not,
// reaches memfs and its reply makes the kernel's attributes stale.

// notifyInvalInode is FUSE_NOTIFY_INVAL_INODE.
const notifyInvalInode = 2

// attrTimeout is how long the kernel may keep ino's attributes.
func (r *rawFS) attrTimeout(ino uint64) time.Duration {
	if m := r.rdwr.Load(); m != nil && (*m)[ino] > 0 {
		return 0
	}
	return cacheTimeout
}

// addRDWR adds d to ino's count of read-write passthrough opens and
// returns the new count. Read-write opens are rare next to replies, so the
// map is copied on change.
func (r *rawFS) addRDWR(ino uint64, d int) int {
	r.rdwrMu.Lock()
	defer r.rdwrMu.Unlock()
	m := map[uint64]int{}
	if old := r.rdwr.Load(); old != nil {
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
		r.rdwr.Store(nil)
	} else {
		r.rdwr.Store(&m)
	}
	return n
}

// rdwrOpened counts a read-write passthrough open of ino; the first has
// the kernel forget ino's attributes, unless inval is false: a CREATE's
// reply replaces them itself, with the zero timeout (and for a
// new inode, the kernel's usual case, the notice would only fail with
// ENOENT, a write to /dev/fuse per create).
func (r *rawFS) rdwrOpened(ino uint64, inval bool) {
	if r.addRDWR(ino, 1) == 1 && inval {
		r.dropAttrs(ino)
	}
}

// rdwrReleased uncounts a read-write passthrough open of ino; the last
// has the kernel forget ino's attributes.
func (r *rawFS) rdwrReleased(ino uint64) {
	if r.addRDWR(ino, -1) == 0 {
		r.dropAttrs(ino)
	}
}

// dropAttrs has the kernel forget ino's attributes, and notes them stale
// for the next listing's READDIRPLUS (rawfs_stale.go).
func (r *rawFS) dropAttrs(ino uint64) {
	r.stale.add(ino)
	r.dev.invalAttr(ino)
}

// createdEmpty gives the attributes of a CREATE or TMPFILE reply the
// hour-long timeout when the file is empty and has no other name, although
// it was opened read-write: what the timeout of zero guards against, a
// store into a shared mapping, cannot happen before something makes the
// file longer (a store beyond the end of a file is SIGBUS), and each way
// to do that either is a request whose reply carries the zero timeout
// (SETATTR, FALLOCATE, COPY_FILE_RANGE) or a passthrough write(2), after
// which the kernel marks the size and times stale itself. It spares the
// GETATTR that the open's permission check would send right after the
// reply: one request in five of a read-write create.
func createdEmpty(out *fuse.EntryOut, st *unix.Stat_t, nlink uint64) {
	if st.Size == 0 && uint64(st.Nlink) == nlink {
		out.SetAttrTimeout(cacheTimeout)
	}
}

// isRDWR says whether an open with open(2) flags, backed by passthrough,
// reads and writes through passthrough: whether a shared mapping of it
// can store into the backing file unseen.
func isRDWR(flags uint32, backed bool) bool {
	return backed && flags&unix.O_ACCMODE == unix.O_RDWR
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
