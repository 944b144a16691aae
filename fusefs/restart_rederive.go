package fusefs

import (
	"errors"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Re-derivation of node ids
//
// A process that takes over a FUSE connection inherits the kernel's node
// ids, which are inode numbers (see doc.go), but none of the references
// behind them (and any server gets node ids the kernel forgot, in file
// handles: rawfs_export.go): memfs and overlay answer ESTALE for an inode number they hold
// no reference to. rederiving wraps a vfs.FS so that such an answer
// makes it find the node again, by its place in the tree, and retry the
// call once.
//
// Finding inode X: a walk of the whole tree through the file system itself
// (OpenDir and ReadDir of every directory, Lookup of each directory to
// descend into it) builds an index from every inode number it meets to one
// place of it: its parent's inode number and its name. The index is kept
// for later derivations. X's path in the index is then looked up from the
// nearest ancestor the file system knows (the root at worst). Each Lookup
// must return the inode number the index says, or the tree has changed
// since the walk: the index is rebuilt once and the path tried again.
//
// References: the path's lookups leave exactly one reference on X and one
// on each ancestor they registered; these stand for the kernel's lookup
// counts, which this process cannot know, and the kernel's FORGETs drop
// them (memfs and overlay drop to zero when told to forget more than they
// hold). Ancestors the file system knew already are not looked up, so their
// counts do not change. Registered ancestors are kept, not forgotten: the
// kernel's dentry cache holds every ancestor of a node it holds, so it
// holds them too; and dropping a registration to zero while the kernel may
// send a request for the same node id could close a descriptor under that
// request (see Limits). The walk forgets its own lookups again.
//
// Misses: an inode in no directory (a file removed while open, an unnamed
// O_TMPFILE) cannot be found. An index built by a walk that met no error
// and started after the last namespace change through the decorator lists
// every inode the tree holds, so a miss in it is answered ESTALE at once,
// with no walk: the index is the negative cache. Every successful create,
// mkdir, mknod, symlink, link, unlink, rmdir and rename through the
// decorator bumps a generation counter, so the next miss walks again.
//
// Cost: a call that does not fail with ESTALE costs one interface call and
// one comparison more than the wrapped call; a successful namespace change
// also one more comparison and an atomic add. Derivations run one at a
// time (rederiver.mu), each holding the lock for its walk and its path.
//
// Design rule: a derivation follows the index; only the first, and the
// first after a namespace change or a path the index got wrong, walks the
// tree (figures: BENCHMARKS.md, "Notes behind the serving loop").
//
// Limits: every directory a walk met, and the ancestors that a failed path
// lookup registered, keep a reference that no FORGET may ever drop: they
// stay registered (an inode record each, and a cached descriptor within
// the FdBudget) until a FORGET of more than they hold or the Layer is
// closed. That bounds the cost by the number of directories. A file that
// has no name (an unlinked file or O_TMPFILE kept alive by a passthrough
// backing file) stays ESTALE here; a successor finds the open ones by
// their handle records instead (FindOrphan, restart.go).

// rederiving returns fs with re-derivation of unknown node ids. Every
// method of fs that fails with ESTALE for an inode number it takes (but
// the root) is retried once after that inode has been found again.
//
// fs must change nothing when it fails with ESTALE (memfs and overlay check
// every inode number they are given before acting), and its tree must
// change only through the decorator while the decorator serves it.
func rederiving(fs vfs.FS) vfs.FS {
	return &rederiver{fs: fs}
}

// rederiver is the file system rederiving returns.
type rederiver struct {
	// fs is the wrapped file system. Immutable.
	fs vfs.FS
	// gen counts the successful namespace changes made through the
	// rederiver. Accessed atomically.
	gen atomic.Uint64

	// mu serializes derivations, and so walks: it is held across calls
	// into fs. It is never taken on the success path.
	mu sync.Mutex
	// index maps the inode number of every entry the last walk met (the
	// root excepted) to one place of it; nil before the first walk.
	// Invariant: following parents from any entry reaches vfs.RootIno
	// without a cycle (a walk records a directory once, when it first
	// meets it, and descends only from that place).
	// Protected by mu.
	index map[uint64]place
	// indexGen is gen as it was when the walk that built index started;
	// complete says that walk met no error.
	// Invariant: if complete and indexGen == gen, index holds every inode
	// reachable from the root. Protected by mu.
	indexGen uint64
	complete bool
	// walks counts the walks made. Protected by mu.
	walks int
}

// place is where a walk found an inode: the name name in the directory
// parent.
type place struct {
	parent uint64
	name   string
}

// Reasons a path lookup fails besides an errno. They never leave this
// file.
var (
	// errNotIndexed: the inode is not in the index.
	errNotIndexed = errors.New("not in the index")
	// errMoved: a lookup along the path found something else.
	errMoved = errors.New("the index is out of date")
)

// changed records a successful namespace change.
func (r *rederiver) changed() { r.gen.Add(1) }

// rederive makes fs know every inode number in inos again, leaving one
// reference on each that it did not know, and says whether it knows all of
// them now.
func (r *rederiver) rederive(inos ...uint64) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, ino := range inos {
		if !r.knownLocked(ino) && r.deriveLocked(ino) != nil {
			return false
		}
	}
	return true
}

// knownLocked says whether fs holds a reference to ino.
//
// Preconditions:
//   - r.mu is locked (so that no derivation registers ino meanwhile).
func (r *rederiver) knownLocked(ino uint64) bool {
	if ino == vfs.RootIno {
		return true
	}
	_, err := r.fs.GetAttr(ino)
	return err != syscall.ESTALE
}

// deriveLocked finds the inode x, which fs does not know, and leaves one
// reference on it. It returns ESTALE if x is in no directory.
//
// Preconditions:
//   - r.mu is locked.
func (r *rederiver) deriveLocked(x uint64) error {
	walked := false
	if r.index == nil {
		r.walkLocked()
		walked = true
	}
	for {
		err := r.lookupPathLocked(x)
		switch {
		case err == nil:
			return nil
		case err == errNotIndexed && r.complete && r.indexGen == r.gen.Load():
			return syscall.ESTALE
		case err != errNotIndexed && err != errMoved:
			return err
		case walked:
			return syscall.ESTALE
		}
		r.walkLocked()
		walked = true
	}
}

// lookupPathLocked looks x up along its path in the index, from its
// nearest ancestor that fs knows, keeping the reference each lookup adds.
//
// Preconditions:
//   - r.mu is locked.
//   - fs does not know x.
func (r *rederiver) lookupPathLocked(x uint64) error {
	// path holds x and its ancestors up to, not including, the first one
	// fs knows, which is from.
	var path []uint64
	var from uint64
	for ino := x; ; {
		p, ok := r.index[ino]
		if !ok {
			return errNotIndexed
		}
		path = append(path, ino)
		if r.knownLocked(p.parent) {
			from = p.parent
			break
		}
		ino = p.parent
	}
	for i := len(path) - 1; i >= 0; i-- {
		want := path[i]
		e, err := r.fs.Lookup(from, r.index[want].name)
		switch err {
		case nil:
		case syscall.ENOENT, syscall.ENOTDIR, syscall.ESTALE:
			return errMoved
		default:
			return err
		}
		if e.Ino() != want {
			r.fs.Forget(e.Ino(), 1)
			return errMoved
		}
		from = want
	}
	return nil
}

// walkLocked rebuilds the index from the whole tree.
//
// Preconditions:
//   - r.mu is locked.
func (r *rederiver) walkLocked() {
	gen := r.gen.Load()
	index := make(map[uint64]place, len(r.index))
	complete := r.walkDirLocked(vfs.RootIno, index)
	r.index, r.indexGen, r.complete = index, gen, complete
	r.walks++
}

// walkDirLocked adds the entries of the directory dir, which fs knows,
// and of every directory below it to index, and says whether it met no
// error.
//
// Preconditions:
//   - r.mu is locked.
func (r *rederiver) walkDirLocked(dir uint64, index map[uint64]place) bool {
	d, err := r.fs.OpenDir(dir)
	if err != nil {
		return false
	}
	type subdir struct {
		ino  uint64
		name string
	}
	var subdirs []subdir
	err = d.ReadDir(0, func(e *vfs.DirEntry) bool {
		if e.Name == "." || e.Name == ".." {
			return true
		}
		if _, seen := index[e.Ino]; seen {
			return true // another link to a file, or a directory met twice
		}
		index[e.Ino] = place{parent: dir, name: e.Name}
		if e.Type == unix.DT_DIR || e.Type == unix.DT_UNKNOWN {
			subdirs = append(subdirs, subdir{e.Ino, e.Name})
		}
		return true
	})
	d.Close()
	complete := err == nil
	for _, s := range subdirs {
		e, err := r.fs.Lookup(dir, s.name)
		if err != nil {
			complete = false
			continue
		}
		switch {
		case e.Ino() != s.ino:
			complete = false
		case e.Stat.Mode&unix.S_IFMT == unix.S_IFDIR:
			complete = r.walkDirLocked(e.Ino(), index) && complete
		}
		// The reference is kept (see Limits): forgetting a directory the
		// file system did not know would drop it to zero, which may close
		// its descriptor under a concurrent request for it.
	}
	return complete
}

// The methods below forward to fs; each that fails with ESTALE rederives
// the inode numbers it takes and is retried once.

func (r *rederiver) Lookup(parent uint64, name string) (vfs.Entry, error) {
	e, err := r.fs.Lookup(parent, name)
	if err == syscall.ESTALE && r.rederive(parent) {
		e, err = r.fs.Lookup(parent, name)
	}
	return e, err
}

func (r *rederiver) Forget(ino, n uint64) { r.fs.Forget(ino, n) }

func (r *rederiver) GetAttr(ino uint64) (unix.Stat_t, error) {
	st, err := r.fs.GetAttr(ino)
	if err == syscall.ESTALE && r.rederive(ino) {
		st, err = r.fs.GetAttr(ino)
	}
	return st, err
}

func (r *rederiver) SetAttr(ino uint64, f vfs.File, a vfs.SetAttr) (unix.Stat_t, error) {
	st, err := r.fs.SetAttr(ino, f, a)
	if err == syscall.ESTALE && r.rederive(ino) {
		st, err = r.fs.SetAttr(ino, f, a)
	}
	return st, err
}

func (r *rederiver) Mkdir(parent uint64, name string, mode uint32, c vfs.Caller) (vfs.Entry, error) {
	e, err := r.fs.Mkdir(parent, name, mode, c)
	if err == syscall.ESTALE && r.rederive(parent) {
		e, err = r.fs.Mkdir(parent, name, mode, c)
	}
	if err == nil {
		r.changed()
	}
	return e, err
}

func (r *rederiver) Mknod(parent uint64, name string, mode uint32, rdev uint64, c vfs.Caller) (vfs.Entry, error) {
	e, err := r.fs.Mknod(parent, name, mode, rdev, c)
	if err == syscall.ESTALE && r.rederive(parent) {
		e, err = r.fs.Mknod(parent, name, mode, rdev, c)
	}
	if err == nil {
		r.changed()
	}
	return e, err
}

func (r *rederiver) Symlink(parent uint64, name, target string, c vfs.Caller) (vfs.Entry, error) {
	e, err := r.fs.Symlink(parent, name, target, c)
	if err == syscall.ESTALE && r.rederive(parent) {
		e, err = r.fs.Symlink(parent, name, target, c)
	}
	if err == nil {
		r.changed()
	}
	return e, err
}

func (r *rederiver) Link(ino, newParent uint64, name string) (vfs.Entry, error) {
	e, err := r.fs.Link(ino, newParent, name)
	if err == syscall.ESTALE && r.rederive(ino, newParent) {
		e, err = r.fs.Link(ino, newParent, name)
	}
	if err == nil {
		r.changed()
	}
	return e, err
}

func (r *rederiver) Unlink(parent uint64, name string) error {
	err := r.fs.Unlink(parent, name)
	if err == syscall.ESTALE && r.rederive(parent) {
		err = r.fs.Unlink(parent, name)
	}
	if err == nil {
		r.changed()
	}
	return err
}

func (r *rederiver) Rmdir(parent uint64, name string) error {
	err := r.fs.Rmdir(parent, name)
	if err == syscall.ESTALE && r.rederive(parent) {
		err = r.fs.Rmdir(parent, name)
	}
	if err == nil {
		r.changed()
	}
	return err
}

func (r *rederiver) Rename(parent uint64, name string, newParent uint64, newName string, flags uint32) error {
	err := r.fs.Rename(parent, name, newParent, newName, flags)
	if err == syscall.ESTALE && r.rederive(parent, newParent) {
		err = r.fs.Rename(parent, name, newParent, newName, flags)
	}
	if err == nil {
		r.changed()
	}
	return err
}

func (r *rederiver) Readlink(ino uint64) (string, error) {
	s, err := r.fs.Readlink(ino)
	if err == syscall.ESTALE && r.rederive(ino) {
		s, err = r.fs.Readlink(ino)
	}
	return s, err
}

func (r *rederiver) Create(parent uint64, name string, flags int, mode uint32, c vfs.Caller, o vfs.OpenOptions) (vfs.Entry, vfs.File, error) {
	e, f, err := r.fs.Create(parent, name, flags, mode, c, o)
	if err == syscall.ESTALE && r.rederive(parent) {
		e, f, err = r.fs.Create(parent, name, flags, mode, c, o)
	}
	if err == nil {
		r.changed()
	}
	return e, f, err
}

func (r *rederiver) Open(ino uint64, flags int, o vfs.OpenOptions) (vfs.File, error) {
	f, err := r.fs.Open(ino, flags, o)
	if err == syscall.ESTALE && r.rederive(ino) {
		f, err = r.fs.Open(ino, flags, o)
	}
	return f, err
}

// FindOrphan finds no name either: it is passed on, or ESTALE.
func (r *rederiver) FindOrphan(ino, dataIno uint64, gen uint32) error {
	if o, ok := r.fs.(vfs.OrphanFinder); ok {
		return o.FindOrphan(ino, dataIno, gen)
	}
	return syscall.ESTALE
}

// Tmpfile makes no name, so it is no namespace change.
func (r *rederiver) Tmpfile(parent uint64, flags int, mode uint32, c vfs.Caller, o vfs.OpenOptions) (vfs.Entry, vfs.File, error) {
	e, f, err := r.fs.Tmpfile(parent, flags, mode, c, o)
	if err == syscall.ESTALE && r.rederive(parent) {
		e, f, err = r.fs.Tmpfile(parent, flags, mode, c, o)
	}
	return e, f, err
}

func (r *rederiver) OpenDir(ino uint64) (vfs.Dir, error) {
	d, err := r.fs.OpenDir(ino)
	if err == syscall.ESTALE && r.rederive(ino) {
		d, err = r.fs.OpenDir(ino)
	}
	return d, err
}

func (r *rederiver) GetXattr(ino uint64, name string, dest []byte) (int, error) {
	n, err := r.fs.GetXattr(ino, name, dest)
	if err == syscall.ESTALE && r.rederive(ino) {
		n, err = r.fs.GetXattr(ino, name, dest)
	}
	return n, err
}

func (r *rederiver) ListXattr(ino uint64, dest []byte) (int, error) {
	n, err := r.fs.ListXattr(ino, dest)
	if err == syscall.ESTALE && r.rederive(ino) {
		n, err = r.fs.ListXattr(ino, dest)
	}
	return n, err
}

func (r *rederiver) SetXattr(ino uint64, name string, value []byte, flags int) error {
	err := r.fs.SetXattr(ino, name, value, flags)
	if err == syscall.ESTALE && r.rederive(ino) {
		err = r.fs.SetXattr(ino, name, value, flags)
	}
	return err
}

func (r *rederiver) RemoveXattr(ino uint64, name string) error {
	err := r.fs.RemoveXattr(ino, name)
	if err == syscall.ESTALE && r.rederive(ino) {
		err = r.fs.RemoveXattr(ino, name)
	}
	return err
}

func (r *rederiver) StatFS() (unix.Statfs_t, error) { return r.fs.StatFS() }

// BirthTime passes BirthTime on; ok is false where fs has none.
func (r *rederiver) BirthTime(ino uint64) (unix.Timespec, bool, error) {
	bt, ok := r.fs.(vfs.BirthTimer)
	if !ok {
		return unix.Timespec{}, false, nil
	}
	t, known, err := bt.BirthTime(ino)
	if err == syscall.ESTALE && r.rederive(ino) {
		t, known, err = bt.BirthTime(ino)
	}
	return t, known, err
}

// Held passes Held on, and derives nothing: an inode fs does not know
// (a successor's, before it is looked up or derived) is not held, and the
// caller does what it does for any inode not held (ReadDirPlus looks the
// entry up, which makes fs know it). False where fs is no Holder.
func (r *rederiver) Held(ino uint64) bool {
	h, ok := r.fs.(vfs.Holder)
	return ok && h.Held(ino)
}

// GetFlags passes GetFlags on; ENOTTY where fs keeps no flags.
func (r *rederiver) GetFlags(ino uint64) (uint32, error) {
	fl, ok := r.fs.(vfs.InodeFlags)
	if !ok {
		return 0, syscall.ENOTTY
	}
	flags, err := fl.GetFlags(ino)
	if err == syscall.ESTALE && r.rederive(ino) {
		flags, err = fl.GetFlags(ino)
	}
	return flags, err
}

// SetFlags passes SetFlags on; ENOTTY where fs keeps no flags.
func (r *rederiver) SetFlags(ino uint64, flags uint32) error {
	fl, ok := r.fs.(vfs.InodeFlags)
	if !ok {
		return syscall.ENOTTY
	}
	err := fl.SetFlags(ino, flags)
	if err == syscall.ESTALE && r.rederive(ino) {
		err = fl.SetFlags(ino, flags)
	}
	return err
}
