package fusefs

import (
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Requests the kernel sends again. A server that takes over a connection
// from one that died asks the kernel to resend every request the dead one
// had read and not answered (Adopt with resend). The dead server may have
// carried such a request out and died before replying, and the tree has
// the result: done again, a mkdir would fail with EEXIST, an unlink with
// ENOENT, and the application would see an error for an operation that
// succeeded. So a resent request (FUSE_UNIQUE_RESEND in its unique) that
// fails that way is answered from the state it left:
//
//   - mkdir, mknod, symlink, link and an O_EXCL create that find the name
//     taken succeed with its entry when it was the parent directory's
//     latest change: its ctime is at most madeSlack before the parent's
//     mtime (tmpfs stamps the new inode, then the directory). The VFS
//     holds the parent's lock from before the request until the reply, so
//     nobody else changed the directory since. A name that existed
//     before and was the directory's latest change too is the one case
//     answered wrongly (success instead of EEXIST).
//   - unlink and rmdir that find no name succeed.
//   - rename that finds no source but the target succeeds.
//
// Everything else is harmless to do twice: lookups and reads, writes at
// their offset, setattr and the xattr setters, which set absolute values.

// resent says whether h is of a request the kernel sent again after the
// server that read it died.
func resent(h *fuse.InHeader) bool { return h.Unique&uniqueResend != 0 }

// made returns the entry of name in parent when a resent request that
// makes it failed with EEXIST, and the dead server made it (see above).
func (r *rawFS) made(h *fuse.InHeader, err error, parent uint64, name string) (vfs.Entry, bool) {
	if err != syscall.EEXIST || !resent(h) {
		return vfs.Entry{}, false
	}
	e, err := r.fs.Lookup(parent, name)
	if err != nil {
		return vfs.Entry{}, false
	}
	pst, err := r.fs.GetAttr(parent)
	ctime := time.Unix(e.Stat.Ctim.Unix()).Add(madeSlack)
	if err != nil || ctime.Before(time.Unix(pst.Mtim.Unix())) {
		r.fs.Forget(e.Ino(), 1)
		return vfs.Entry{}, false
	}
	return e, true
}

// gone says whether a resent request that removes a name failed only
// because the dead server removed it already.
func gone(h *fuse.InHeader, err error) bool {
	return err == syscall.ENOENT && resent(h)
}

// madeSlack is how much older than its directory's mtime an entry made by
// the directory's latest change may be.
const madeSlack = 10 * time.Millisecond
