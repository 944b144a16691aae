package memfs

import (
	"encoding/binary"
	"fmt"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// inode is an inode of the instance that some caller holds a reference to.
type inode struct {
	// ino is the tmpfs inode number. Immutable.
	ino uint64
	// gen is the generation from the file handle. Immutable.
	gen uint32
	// fileType is the S_IFMT bits of the inode's mode. Immutable.
	fileType uint32
	// handle reopens the inode without resolving a path. Immutable.
	handle unix.FileHandle

	// refs counts the references callers hold (lookups plus open Files).
	// Protected by Layer.mu.
	refs uint64
	// pathFd is a cached O_PATH descriptor of the inode, or -1. It is set
	// once, while the inode is registered, and closed when the last
	// reference is dropped; callers use it only while they hold a
	// reference, so it is never closed under them. Protected by Layer.mu
	// for writing; read without the lock by reference holders.
	pathFd int

	// mu protects the fields below.
	mu sync.Mutex
	// seals are the inode's seals; valid when sealsLoaded.
	seals       Seals
	sealsLoaded bool
	// writers counts open Files with write access.
	writers int
	// directWriters counts writable Files whose writes bypass memfs
	// (Passthrough). Invariant: directWriters <= writers.
	directWriters int
	// defaultACL says whether the directory has a default POSIX ACL
	// (aclDefaultXattr), which createModeLocked consults for every inode
	// made in it; caps whether the inode has a capXattr, which the kernel
	// asks for before a write or chown of a file (to clear it). Each is
	// learnt from the instance, or from what this Layer made; a Layer
	// that reopens an instance starts with both unknown. Only this Layer
	// sets xattrs in its instance, and it sets and removes these two with
	// mu held (see knownXattr), so a remembered state holds until then.
	defaultACL, caps xattrState
}

// get returns the registered inode ino.
func (l *Layer) get(ino uint64) (*inode, error) {
	l.mu.Lock()
	i := l.inodes[ino]
	l.mu.Unlock()
	if i == nil {
		return nil, syscall.ESTALE
	}
	return i, nil
}

// pathFd returns an O_PATH descriptor of i. When transient is true the
// caller must close fd itself.
func (l *Layer) pathFd(i *inode) (fd int, transient bool, err error) {
	if i.pathFd >= 0 {
		return i.pathFd, false, nil
	}
	fd, err = unix.OpenByHandleAt(l.rootFd, i.handle, unix.O_PATH|unix.O_CLOEXEC)
	if err != nil {
		return -1, false, Errno(err)
	}
	return fd, true, nil
}

// openInode opens the inode ino with flags (no O_CREAT) by its handle.
func (l *Layer) openInode(i *inode, flags int) (int, error) {
	fd, err := unix.OpenByHandleAt(l.rootFd, i.handle, flags|unix.O_CLOEXEC)
	if err == unix.ESTALE {
		// The inode was removed and its last user let go of it.
		return -1, syscall.ENOENT
	}
	return fd, Errno(err)
}

// withFd runs fn with an O_PATH descriptor of the referenced inode ino.
func (l *Layer) withFd(ino uint64, fn func(i *inode, fd int) error) error {
	i, err := l.get(ino)
	if err != nil {
		return err
	}
	fd, transient, err := l.pathFd(i)
	if err != nil {
		return err
	}
	err = fn(i, fd)
	if transient {
		unix.Close(fd)
	}
	return err
}

// register adds one reference to the inode open as fd (any kind of
// descriptor of it) with attributes st, registering it first if it is new.
// fd is not consumed.
func (l *Layer) register(fd int, st *unix.Stat_t) (vfs.Entry, error) {
	e, _, err := l.registerFd(fd, st, false, knownXattrs{})
	return e, err
}

// registerFd is register; with adopt, fd must be an O_PATH descriptor,
// and it becomes the inode's cached descriptor if the inode is new and the
// cache has room, in which case adopted is true and the caller must not
// close fd. An inode registered anew starts knowing known (the caller has
// just made it); one registered already keeps what it knows, which a
// holder of a reference may have changed since it was made.
func (l *Layer) registerFd(fd int, st *unix.Stat_t, adopt bool, known knownXattrs) (e vfs.Entry, adopted bool, err error) {
	l.mu.Lock()
	if i := l.inodes[st.Ino]; i != nil {
		i.refs++
		l.mu.Unlock()
		return vfs.Entry{Stat: *st, Gen: i.gen}, false, nil
	}
	l.mu.Unlock()

	h, _, err := unix.NameToHandleAt(fd, "", unix.AT_EMPTY_PATH)
	if err != nil {
		return vfs.Entry{}, false, Errno(err)
	}
	i := &inode{
		ino:      st.Ino,
		gen:      handleGen(h),
		fileType: st.Mode & unix.S_IFMT,
		handle:   h,
		refs:     1,
		pathFd:   -1,

		defaultACL: known.defaultACL,
		caps:       known.caps,
	}

	l.mu.Lock()
	defer l.mu.Unlock()
	if old := l.inodes[st.Ino]; old != nil {
		// Registered by a concurrent caller meanwhile.
		old.refs++
		return vfs.Entry{Stat: *st, Gen: old.gen}, false, nil
	}
	if l.opts.Fds.take() {
		if adopt {
			i.pathFd, adopted = fd, true
		} else if pfd, err := unix.OpenByHandleAt(l.rootFd, h, unix.O_PATH|unix.O_CLOEXEC); err == nil {
			i.pathFd = pfd
		}
		if i.pathFd >= 0 {
			l.cachedFds++
		} else {
			l.opts.Fds.give()
		}
	}
	l.inodes[st.Ino] = i
	return vfs.Entry{Stat: *st, Gen: i.gen}, adopted, nil
}

// LookupHandle adds one reference to the inode ino of generation gen, found
// by its file handle rather than by a name: it finds a file that has none
// (removed while open, or made with O_TMPFILE) as long as something keeps
// it, such as a descriptor of another process or a passthrough backing
// file the kernel holds. A successor server reopens such files so.
//
// Errors: ESTALE (no such inode alive).
func (l *Layer) LookupHandle(ino uint64, gen uint32) (vfs.Entry, error) {
	b := make([]byte, 12)
	binary.LittleEndian.PutUint32(b, gen)
	binary.LittleEndian.PutUint64(b[4:], ino)
	fd, err := unix.OpenByHandleAt(l.rootFd, unix.NewFileHandle(l.handleType, b), unix.O_PATH|unix.O_CLOEXEC)
	if err != nil {
		if err == unix.ENOENT {
			err = unix.ESTALE
		}
		return vfs.Entry{}, Errno(err)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Ino != ino {
		unix.Close(fd)
		return vfs.Entry{}, syscall.ESTALE
	}
	e, adopted, err := l.registerFd(fd, &st, true, knownXattrs{})
	if !adopted {
		unix.Close(fd)
	}
	return e, err
}

// FindOrphan adds one reference to the inode ino of generation gen, which
// may have no name (see LookupHandle); it implements vfs.OrphanFinder. A
// memfs inode is its own tmpfs inode, so dataIno must be ino.
//
// Errors: ESTALE (no such inode alive, or dataIno is not ino).
func (l *Layer) FindOrphan(ino, dataIno uint64, gen uint32) error {
	if ino != dataIno {
		return syscall.ESTALE
	}
	_, err := l.LookupHandle(ino, gen)
	return err
}

// Gen returns the generation of the referenced inode ino.
func (l *Layer) Gen(ino uint64) (uint32, error) {
	i, err := l.get(ino)
	if err != nil {
		return 0, err
	}
	return i.gen, nil
}

// handleGen extracts the generation from a tmpfs file handle, which encodes
// {generation, ino low, ino high} as 32-bit words.
func handleGen(h unix.FileHandle) uint32 {
	b := h.Bytes()
	if len(b) < 4 {
		return 0
	}
	return binary.LittleEndian.Uint32(b)
}

// initRoot registers the root directory with its permanent reference.
func (l *Layer) initRoot() error {
	var st unix.Stat_t
	if err := unix.Fstat(l.rootFd, &st); err != nil {
		return err
	}
	if st.Ino != vfs.RootIno {
		return fmt.Errorf("tmpfs root has inode %d, want %d", st.Ino, vfs.RootIno)
	}
	if _, err := l.register(l.rootFd, &st); err != nil {
		return err
	}
	// Every handle of the instance has the root's type (LookupHandle).
	l.handleType = l.inodes[vfs.RootIno].handle.Type()
	l.dev = st.Dev
	return nil
}

// Forget drops n references to ino. When none are left the inode leaves the
// table; its memory is freed by the kernel once it is unlinked and closed.
//
// A Forget that drops the last reference must not run concurrently with
// another call on ino.
func (l *Layer) Forget(ino uint64, n uint64) {
	l.mu.Lock()
	defer l.mu.Unlock()
	i := l.inodes[ino]
	if i == nil || ino == vfs.RootIno {
		return
	}
	if n >= i.refs {
		delete(l.inodes, ino)
		i.closeFdLocked(l)
		i.refs = 0
		return
	}
	i.refs -= n
}

// closeFdLocked closes i's cached descriptor.
//
// Preconditions:
//   - l.mu is locked.
func (i *inode) closeFdLocked(l *Layer) {
	if i.pathFd >= 0 {
		unix.Close(i.pathFd)
		i.pathFd = -1
		l.cachedFds--
		l.opts.Fds.give()
	}
}

// Held reports whether ino is registered, which is to say that references
// to it are held (refs > 0; the root is always held); it implements
// vfs.Holder. refs counts lookups and open Files and Dirs alike, so an open
// File makes its inode held even when every lookup of it was forgotten.
// That is what a FUSE server wants: the kernel keeps an inode while a
// file of it is open (the open file pins its dentry), so it still holds
// the inode. Where the reference is the server's own (a directory kept
// open between READDIRs, say) the answer errs toward held, which the
// vfs.Holder contract allows: the server then sends the name alone and the
// kernel looks the entry up itself if it needs it.
func (l *Layer) Held(ino uint64) bool {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.inodes[ino] != nil
}

// Refs returns the number of references held on ino (0 if it is not
// registered). It exists for tests and invariant checks.
func (l *Layer) Refs(ino uint64) uint64 {
	l.mu.Lock()
	defer l.mu.Unlock()
	if i := l.inodes[ino]; i != nil {
		return i.refs
	}
	return 0
}

// CheckInvariants verifies the inode table's invariants and returns a
// description of the first one broken. A detached Layer has none left.
func (l *Layer) CheckInvariants() error {
	l.mu.Lock()
	defer l.mu.Unlock()
	if l.inodes == nil {
		return nil
	}
	cached := 0
	for ino, i := range l.inodes {
		if i.ino != ino {
			return fmt.Errorf("inode %d registered as %d", i.ino, ino)
		}
		if i.refs == 0 {
			return fmt.Errorf("inode %d registered with no reference", ino)
		}
		if i.pathFd >= 0 {
			cached++
		}
		i.mu.Lock()
		w, d := i.writers, i.directWriters
		i.mu.Unlock()
		if d > w || w < 0 {
			return fmt.Errorf("inode %d: %d direct writers of %d writers", ino, d, w)
		}
	}
	if cached != l.cachedFds {
		return fmt.Errorf("%d cached descriptors, counted %d", cached, l.cachedFds)
	}
	if used := l.opts.Fds.InUse(); used < 0 || used > l.opts.Fds.limit {
		return fmt.Errorf("descriptor budget: %d in use of %d", used, l.opts.Fds.limit)
	}
	if l.inodes[vfs.RootIno] == nil {
		return fmt.Errorf("root is not registered")
	}
	return nil
}
