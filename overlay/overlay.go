// Package overlay implements the union of a memfs upper layer over a
// read-only lower tree: the writable file system of a csi-memfs volume whose
// lower layer comes from a container image.
//
// # Model
//
// An overlay FS serves one tree, and implements vfs.FS (and
// vfs.OrphanFinder) directly: fusefs serves it with no adapter. A name is looked up in the upper layer
// first, then (unless the upper directory is opaque) in the lower
// directory the upper directory stands for. The upper layer holds every
// change; the lower is never written. The state that makes the union, which
// must survive the daemon, lives in the upper tree as memfs markers
// (trusted.memfs.* attributes, invisible to users):
//
//   - "ov" on an upper entry that came from the lower (a copy-up) or hides
//     one: "w" is a whiteout (an empty regular file standing for a deleted
//     lower name); "o INO" is an entry whose overlay inode number is INO;
//     "o INO lPATH" is one whose lower data or directory is at PATH. An upper
//     directory with no "ov" marker, or one without a lower path, is opaque:
//     nothing of the lower shows through it. A directory's lower path is
//     recorded absolutely, so a renamed lower directory keeps its contents
//     (no EXDEV, no copy of the subtree).
//   - "ranges" on a partially copied-up regular file: "LIMIT A-B C-D ...";
//     bytes below LIMIT outside the listed ranges still read from the lower
//     file at the entry's lower path. It is removed once the file is whole.
//   - "mixed" on an upper directory that may hold entries carrying "ov";
//     readdir reads the markers of entries only in such directories.
//   - "root" on the upper root once it has taken the lower root's
//     attributes.
//   - "links N P" on an index entry (see Hard links).
//   - "copied" on the upper root: the bytes ever copied up, for Usage.
//
// The upper root holds one hidden directory, WorkName, which users can
// neither see nor create: new copies are built there under temporary names
// and renamed into place, so a failed or interrupted copy-up leaves no half
// state in the visible tree; it also holds the hard-link index and the
// shared whiteout, whiteoutName, which every whiteout made since is a hard
// link of (as Linux overlayfs shares one): one linkat per removed lower
// name, no inode each, and a merge tells such a whiteout by its inode
// number without reading its marker. Whiteouts of other inodes, made by
// earlier versions, keep working by their marker.
//
// # Inode numbers
//
// An entry that came from the lower has inode number lowerIno|1<<63 (see
// lowerOvIno) before and after copy-up (the upper copy records it); an entry
// made in the upper has its upper inode number, which tmpfs keeps below
// 1<<63. The root is vfs.RootIno. Hard links within the lower share a
// lower inode number and so an overlay one.
//
// # Hard links
//
// When a lower file with more than one link is copied up, its upper copy is
// also linked into WorkName as "i<overlay inode number in hex>" (the
// index). A later lookup of another lower name of the same inode finds the
// index entry and links it into place; removing or replacing a lower name
// of such a file copies it up first. The index entry's "links" marker holds
// the lower link count N and how many lower names P have been placed, and
// the link count shown is upper links - 1 + N - P.
//
// # Data and passthrough
//
// A write open copies a file's metadata up; files up to smallFile also
// copy their bytes, bigger ones stay partial and copy the pages each write
// touches (range-granular copy-up). A File of a partial file is never
// Direct: the daemon serves it, reading each byte from the layer that holds
// it. A read-only open of a file entirely in the lower is Direct on the
// lower file's read-only descriptor when the caller asks; a read-only or
// write open of a whole upper file is Direct as memfs allows. While a lower
// passthrough open exists, upper opens of the same inode are not Direct
// (the kernel stacks an inode on one backing file). A kernel passthrough
// reader of the lower file keeps reading the lower bytes if another open
// copies the file up and writes it (as Linux overlayfs before 4.19 did);
// in-process reads of every File follow the copy-up.
//
// # References
//
// As the vfs contract says: every Entry, File and Dir returned holds a
// reference on the overlay inode, dropped by Forget, Release and Close. A node also holds one
// reference on its parent node, and one memfs reference on its upper inode.
// Forget drops no more than the callers' references: a directory stays
// while a node in it is held, however much a server forgets.
//
// # Lock order
//
//	FS.treeMu (namespace: lookups read-lock, changes and copy-up write-lock)
//	  node.mu (a file's data state: partial copy-up ranges)
//	    File.mu
//	      FS.mu (the node table; nodes' references and locations)
//	    FS.copiedMu (the copied-up byte count)
//
// # Limits
//
// Device nodes are inert, in either layer: the upper is mounted nodev and
// the overlay opens only regular files and directories (Open is EINVAL for
// a device, as for a FIFO); a change of a lower device's metadata copies
// it up as a device with the same number. A lower file whose last name was
// removed while it is open cannot be copied up any more (ENOENT). A
// rename that leaves a whiteout does two upper renames; a crash between
// them shows the lower entry at the old name again (nothing is lost).
//
// # Errors
//
// Every method returns nil or a bare syscall.Errno.
package overlay

import (
	"encoding/binary"
	"fmt"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// WorkName is the hidden directory in the upper root.
const WorkName = ".memfs-work"

// whiteoutName is the shared whiteout in WorkName. Neither a temporary
// ("t...", see cleanWork) nor an index entry ("i...").
const whiteoutName = "whiteout"

// Marker keys (stored by memfs as trusted.memfs.<key>).
const (
	markerOv     = "ov"
	markerRanges = "ranges"
	markerMixed  = "mixed"
	markerRoot   = "root"
	markerLinks  = "links"
	markerCopied = "copied"
)

// lowerBit tags the inode numbers of entries that came from the lower.
const lowerBit = 1 << 63

// lowerOvIno returns the overlay inode number of the lower inode ino.
func lowerOvIno(ino uint64) uint64 {
	if ino&lowerBit != 0 {
		// Never seen on Linux file systems; fold it so it stays tagged.
		ino ^= ino >> 32
	}
	return ino | lowerBit
}

// An FS is served directly: no adapter stands between it and the server.
var (
	_ vfs.FS           = (*FS)(nil)
	_ vfs.OrphanFinder = (*FS)(nil)
	_ vfs.Holder       = (*FS)(nil)
	_ vfs.File         = (*File)(nil)
	_ vfs.HandleFile   = (*File)(nil)
	_ vfs.Dir          = (*Dir)(nil)
)

// FS is an overlay of a memfs upper Layer over a Lower.
type FS struct {
	// upper is the writable layer. Immutable.
	upper *memfs.Layer
	// lower is the read-only layer, or nil. Immutable.
	lower Lower
	// workIno is the upper inode of WorkName; FS holds a memfs reference
	// on it. Immutable.
	workIno uint64
	// whiteoutIno is the upper inode of the shared whiteout (whiteoutName);
	// FS holds a memfs reference on it. Immutable.
	whiteoutIno uint64
	// copiedMu serializes updates of copiedUp and of its record.
	copiedMu sync.Mutex
	// copiedUp counts the bytes ever copied from the lower into the upper;
	// the "copied" marker of the upper root keeps it across daemons.
	// Protected by copiedMu for writing; accessed atomically.
	copiedUp atomic.Int64
	// tmpSeq names temporary entries in WorkName. Accessed atomically.
	tmpSeq atomic.Uint64

	// treeMu serializes changes of the namespace (and copy-up) against
	// each other and against lookups.
	treeMu sync.RWMutex

	// mu protects nodes, and the refs, parent and name of every node.
	mu sync.Mutex
	// nodes holds every node someone holds a reference to.
	// Invariant: every node in nodes has refs > 0, except the root, which
	// is always present.
	nodes map[uint64]*node
	// root is the root node. Immutable.
	root *node
}

// node is an overlay inode that some caller holds a reference to.
type node struct {
	// ino is the overlay inode number. Immutable.
	ino uint64
	// typ is the S_IFMT bits of the mode. Immutable.
	typ uint32

	// refs counts references: callers' (lookups, open Files and Dirs) and
	// one per child node. Protected by FS.mu.
	refs uint64
	// kids counts the references of child nodes (those whose parent is
	// this node). Invariant: kids <= refs. Protected by FS.mu.
	kids uint64

	// parent and name locate the node (one of its names, for a hard link);
	// parent is nil for the root and for a node whose name was removed.
	// Protected by FS.mu: lookups, which hold FS.treeMu only for reading,
	// move them too (setParent).
	parent *node
	name   string

	// upper is the node's upper inode, or 0 while it exists only in the
	// lower. Once set it does not change. Protected by FS.treeMu and mu
	// for writing; either suffices for reading.
	upper uint64
	// lowerPath is the node's lower path; meaningful when hasLower. For a
	// directory it is the lower directory merged into it; for a file, where
	// its bytes not yet copied up live. Protected like upper.
	lowerPath string
	hasLower  bool
	// indexed says the node's upper copy is linked into the hard-link
	// index. Protected like upper.
	indexed bool
	// mixed says the node's upper directory carries the "mixed" marker,
	// which is never removed, so that setMixed need not read it again.
	// Set only, under FS.treeMu for writing; read under FS.treeMu.
	mixed bool

	// mu protects the fields below.
	mu sync.Mutex
	// partial says the file is copied up but some of its bytes are only in
	// the lower. Invariant: partial implies upper != 0 and hasLower.
	partial bool
	// limit is the size of the lower data still meaningful: bytes at or
	// beyond it never read from the lower. Valid when partial.
	limit int64
	// copied holds the byte ranges below limit that live in the upper.
	// Valid when partial.
	copied rangeSet
	// lowerDirect counts open Files whose bytes the kernel reads from the
	// lower file itself (passthrough). While there are any, upper opens are
	// not direct: the kernel stacks an inode on one backing file.
	lowerDirect int
	// subdirs counts the subdirectories a merged directory shows, for its
	// link count; valid when subdirsKnown. A merge of the directory sets
	// it (under FS.treeMu for reading); a mkdir, rmdir or rename in it
	// adjusts it, and one that fails part way forgets it (under FS.treeMu
	// for writing), so that the
	// GETATTR the kernel sends after each change in a big directory costs
	// no merge. Invariant: when subdirsKnown, subdirs is the number of
	// directories mergedEntriesLocked shows.
	subdirs      int
	subdirsKnown bool
}

// addSubdirs adjusts n's count of subdirectories by d, if known.
//
// Preconditions:
//   - FS.treeMu is locked for writing; n.mu is not.
func (n *node) addSubdirs(d int) {
	n.mu.Lock()
	if n.subdirsKnown {
		n.subdirs += d
	}
	n.mu.Unlock()
}

// forgetSubdirs drops n's count of subdirectories.
//
// Preconditions:
//   - FS.treeMu is locked for writing; n.mu is not.
func (n *node) forgetSubdirs() {
	n.mu.Lock()
	n.subdirs, n.subdirsKnown = 0, false
	n.mu.Unlock()
}

// New returns the overlay of upper over lower (nil for none). It creates
// WorkName in the upper root if missing, removes what an interrupted
// copy-up or create left there, and gives a fresh upper root the lower root's
// attributes.
func New(upper *memfs.Layer, lower Lower) (*FS, error) {
	fs := &FS{upper: upper, lower: lower, nodes: map[uint64]*node{}}
	e, err := upper.Lookup(vfs.RootIno, WorkName)
	if err == syscall.ENOENT {
		e, err = upper.Mkdir(vfs.RootIno, WorkName, 0o700, vfs.Root)
	}
	if err != nil {
		return nil, fmt.Errorf("overlay: work directory: %w", err)
	}
	fs.workIno = e.Ino()
	if err := fs.cleanWork(); err != nil {
		upper.Forget(fs.workIno, 1)
		return nil, fmt.Errorf("overlay: clean work directory: %w", err)
	}
	if err := fs.initWhiteout(); err != nil {
		upper.Forget(fs.workIno, 1)
		return nil, fmt.Errorf("overlay: shared whiteout: %w", err)
	}
	var cb [24]byte
	if n, err := upper.GetMarker(vfs.RootIno, markerCopied, cb[:]); err == nil {
		if v, err := strconv.ParseInt(string(cb[:n]), 10, 64); err == nil {
			fs.copiedUp.Store(v)
		}
	}
	fs.root = &node{ino: vfs.RootIno, typ: unix.S_IFDIR, refs: 1, upper: vfs.RootIno, hasLower: lower != nil}
	fs.nodes[vfs.RootIno] = fs.root
	if lower != nil {
		if err := fs.initRoot(); err != nil {
			fs.Close()
			return nil, fmt.Errorf("overlay: root: %w", err)
		}
	}
	return fs, nil
}

// Close drops the FS's references on the work directory and the shared
// whiteout. The caller closes the layers.
func (fs *FS) Close() {
	fs.upper.Forget(fs.whiteoutIno, 1)
	fs.upper.Forget(fs.workIno, 1)
}

// Upper returns the upper layer.
func (fs *FS) Upper() *memfs.Layer { return fs.upper }

// initRoot copies the lower root's attributes to the upper root once.
func (fs *FS) initRoot() error {
	var b [4]byte
	if _, err := fs.upper.GetMarker(vfs.RootIno, markerRoot, b[:]); err == nil {
		return nil
	}
	st, err := fs.lower.Lstat("")
	if err != nil {
		return err
	}
	if err := fs.copyXattrs("", vfs.RootIno); err != nil {
		return err
	}
	if _, err := fs.upper.SetAttr(vfs.RootIno, nil, vfs.SetAttr{
		Valid: vfs.SetUid | vfs.SetGid | vfs.SetMode | vfs.SetAtime | vfs.SetMtime,
		Uid:   st.Uid, Gid: st.Gid, Mode: st.Mode & 07777,
		Atime: st.Atim, Mtime: st.Mtim,
	}); err != nil {
		return err
	}
	if err := fs.upper.SetMarker(vfs.RootIno, markerMixed, []byte("1"), 0); err != nil {
		return err
	}
	return fs.upper.SetMarker(vfs.RootIno, markerRoot, []byte("1"), 0)
}

// cleanWork removes the temporaries in WorkName, and a default ACL one
// lent it (inheritingFrom).
func (fs *FS) cleanWork() error {
	if err := fs.upper.RemoveXattr(fs.workIno, aclDefault); err != nil && err != syscall.ENODATA {
		return err
	}
	var names []string
	d, err := fs.upper.OpenDir(fs.workIno)
	if err != nil {
		return err
	}
	err = d.ReadDir(0, func(e *vfs.DirEntry) bool {
		if strings.HasPrefix(e.Name, "t") {
			names = append(names, e.Name)
		}
		return true
	})
	d.Close()
	if err != nil {
		return err
	}
	for _, name := range names {
		if err := fs.removeAll(fs.workIno, name); err != nil {
			return err
		}
	}
	return nil
}

// removeAll removes name from the upper directory parent with everything
// under it.
func (fs *FS) removeAll(parent uint64, name string) error {
	err := fs.upper.Unlink(parent, name)
	if err != syscall.EISDIR {
		return err
	}
	e, err := fs.upper.Lookup(parent, name)
	if err != nil {
		return err
	}
	defer fs.upper.Forget(e.Ino(), 1)
	names, err := fs.upperNames(e.Ino())
	if err != nil {
		return err
	}
	for _, n := range names {
		if err := fs.removeAll(e.Ino(), n); err != nil {
			return err
		}
	}
	return fs.upper.Rmdir(parent, name)
}

// tmpName returns a fresh temporary name for WorkName.
func (fs *FS) tmpName() string {
	return "t" + strconv.FormatUint(fs.tmpSeq.Add(1), 10)
}

// get returns the node ino, which the caller holds a reference to.
func (fs *FS) get(ino uint64) (*node, error) {
	fs.mu.Lock()
	n := fs.nodes[ino]
	fs.mu.Unlock()
	if n == nil {
		return nil, syscall.ESTALE
	}
	return n, nil
}

// ref adds a reference to n, which is in the table.
func (fs *FS) ref(n *node) {
	fs.mu.Lock()
	n.refs++
	fs.mu.Unlock()
}

// Forget drops n references to ino. Forgetting more than the callers hold
// drops theirs, never those of the nodes in ino (see unref).
func (fs *FS) Forget(ino, n uint64) {
	fs.mu.Lock()
	nd := fs.nodes[ino]
	fs.mu.Unlock()
	if nd == nil {
		return
	}
	fs.unref(nd, n)
}

// Held reports whether callers hold references to ino (lookups not
// forgotten, open Files and Dirs); it implements vfs.Holder. The
// references a node's children hold on it are not the callers': a
// directory kept in the table only by its children is not held. Open
// Files count, as in memfs.Layer.Held: the kernel keeps an inode while a
// file of it is open. The root is always held.
func (fs *FS) Held(ino uint64) bool {
	fs.mu.Lock()
	defer fs.mu.Unlock()
	n := fs.nodes[ino]
	return n != nil && (n == fs.root || n.refs > n.kids)
}

// unref drops k of the callers' references to n; a node left with none
// leaves the table and drops its references on its parent and its upper
// inode. The references of n's children are not the callers': k is cut to
// what the callers hold, so that a directory stays while a node in it is
// held (a server that took over a connection may forget the lookups of its
// predecessor, more than it holds).
func (fs *FS) unref(n *node, k uint64) {
	fs.drop(n, k, false)
}

// drop drops k references to n; kid says they are the one reference a
// child of n held.
func (fs *FS) drop(n *node, k uint64, kid bool) {
	for n != nil {
		fs.mu.Lock()
		if n == fs.root {
			if kid {
				n.kids--
			}
			fs.mu.Unlock()
			return
		}
		if kid {
			n.kids--
		} else if held := n.refs - n.kids; k > held {
			k = held
		}
		if k < n.refs {
			n.refs -= k
			fs.mu.Unlock()
			return
		}
		n.refs = 0
		if fs.nodes[n.ino] == n {
			delete(fs.nodes, n.ino)
		}
		fs.mu.Unlock()
		// The node is unreachable now: nobody else reads its fields.
		if n.upper != 0 {
			fs.upper.Forget(n.upper, 1)
		}
		n, k, kid = n.parent, 1, true
	}
}

// meta is the decoded "ov" marker of an upper entry.
type meta struct {
	whiteout  bool
	ino       uint64 // overlay inode number, or 0
	hasLower  bool
	lowerPath string
}

func (m meta) encode() []byte {
	if m.whiteout {
		return []byte("w")
	}
	s := "o " + strconv.FormatUint(m.ino, 10)
	if m.hasLower {
		s += " l" + m.lowerPath
	}
	return []byte(s)
}

func decodeMeta(b []byte) (meta, error) {
	s := string(b)
	if s == "w" {
		return meta{whiteout: true}, nil
	}
	rest, ok := strings.CutPrefix(s, "o ")
	if !ok {
		return meta{}, syscall.EIO
	}
	num, path, hasPath := strings.Cut(rest, " ")
	ino, err := strconv.ParseUint(num, 10, 64)
	if err != nil {
		return meta{}, syscall.EIO
	}
	m := meta{ino: ino}
	if hasPath {
		if !strings.HasPrefix(path, "l") {
			return meta{}, syscall.EIO
		}
		m.hasLower, m.lowerPath = true, path[1:]
	}
	return m, nil
}

// maxMarker bounds a marker's size (tmpfs takes up to 64 KiB per value).
const maxMarker = 64 << 10

// readMeta reads the "ov" marker of the referenced upper inode ino; an
// entry without one has the zero meta.
func (fs *FS) readMeta(ino uint64) (meta, error) {
	buf := make([]byte, 8192)
	n, err := fs.upper.GetMarker(ino, markerOv, buf)
	if err == syscall.ERANGE {
		buf = make([]byte, maxMarker)
		n, err = fs.upper.GetMarker(ino, markerOv, buf)
	}
	switch err {
	case nil:
		return decodeMeta(buf[:n])
	case syscall.ENODATA:
		return meta{}, nil
	}
	return meta{}, err
}

// readMetaAt reads the "ov" marker of the entry name of the upper directory
// parent without taking a reference on it.
func (fs *FS) readMetaAt(parent uint64, name string) (meta, error) {
	buf := make([]byte, 8192)
	n, err := fs.upper.GetMarkerAt(parent, name, markerOv, buf)
	if err == syscall.ERANGE {
		buf = make([]byte, maxMarker)
		n, err = fs.upper.GetMarkerAt(parent, name, markerOv, buf)
	}
	switch err {
	case nil:
		return decodeMeta(buf[:n])
	case syscall.ENODATA:
		return meta{}, nil
	}
	return meta{}, err
}

// isMixed says whether the upper directory ino may hold entries with
// markers.
func (fs *FS) isMixed(ino uint64) bool {
	var b [4]byte
	_, err := fs.upper.GetMarker(ino, markerMixed, b[:])
	return err != syscall.ENODATA
}

// setMixed marks the upper directory of n as holding entries with markers.
//
// Preconditions:
//   - fs.treeMu is locked for writing; n.upper != 0.
func (fs *FS) setMixed(n *node) error {
	if n.mixed {
		return nil
	}
	if !fs.isMixed(n.upper) {
		if err := fs.upper.SetMarker(n.upper, markerMixed, []byte("1"), 0); err != nil {
			return err
		}
	}
	n.mixed = true
	return nil
}

// addCopied counts n more bytes copied up, and records the total.
func (fs *FS) addCopied(n int64) {
	if n == 0 {
		return
	}
	fs.copiedMu.Lock()
	defer fs.copiedMu.Unlock()
	v := fs.copiedUp.Add(n)
	// Best effort: a lost update only makes the count low.
	fs.upper.SetMarker(vfs.RootIno, markerCopied, []byte(strconv.FormatInt(v, 10)), 0)
}

// Usage is a volume's usage: the upper layer's, and how much of it holds
// bytes copied up from the lower.
type Usage struct {
	memfs.Usage
	// CopiedUpBytes counts the bytes ever copied from the lower into the
	// upper (copy-up copies only what it must: small files whole, the
	// touched pages of big ones). Data written by users is the rest of
	// BytesUsed.
	CopiedUpBytes uint64
}

// Usage reports the volume's usage.
func (fs *FS) Usage() (Usage, error) {
	u, err := fs.upper.Usage()
	if err != nil {
		return Usage{}, err
	}
	return Usage{Usage: u, CopiedUpBytes: uint64(fs.copiedUp.Load())}, nil
}

// StatFS reports the upper layer's statfs.
func (fs *FS) StatFS() (unix.Statfs_t, error) { return fs.upper.StatFS() }

// CheckInvariants verifies the node table and returns a description of the
// first broken invariant.
func (fs *FS) CheckInvariants() error {
	fs.treeMu.RLock()
	defer fs.treeMu.RUnlock()
	fs.mu.Lock()
	nodes := make([]*node, 0, len(fs.nodes))
	for ino, n := range fs.nodes {
		if n.ino != ino {
			fs.mu.Unlock()
			return fmt.Errorf("node %#x registered as %#x", n.ino, ino)
		}
		if n.refs == 0 {
			fs.mu.Unlock()
			return fmt.Errorf("node %#x registered with no reference", ino)
		}
		if n.parent != nil && fs.nodes[n.parent.ino] != n.parent {
			fs.mu.Unlock()
			return fmt.Errorf("node %#x has an unregistered parent %#x", n.ino, n.parent.ino)
		}
		if n.kids > n.refs {
			fs.mu.Unlock()
			return fmt.Errorf("node %#x has %d references, %d of them its children's", n.ino, n.refs, n.kids)
		}
		nodes = append(nodes, n)
	}
	kids := map[*node]uint64{}
	for _, n := range nodes {
		if n.parent != nil {
			kids[n.parent]++
		}
	}
	for _, n := range nodes {
		// A child leaving the table drops its reference on n just after.
		if kids[n] > n.kids {
			fs.mu.Unlock()
			return fmt.Errorf("node %#x has %d children, counts %d", n.ino, kids[n], n.kids)
		}
	}
	fs.mu.Unlock()
	for _, n := range nodes {
		n.mu.Lock()
		bad := n.partial && (n.upper == 0 || !n.hasLower)
		n.mu.Unlock()
		if bad {
			return fmt.Errorf("node %#x is partial without both layers", n.ino)
		}
		if n.upper == 0 && !n.hasLower {
			return fmt.Errorf("node %#x is in neither layer", n.ino)
		}
		if n.upper != 0 && fs.upper.Refs(n.upper) == 0 {
			return fmt.Errorf("node %#x holds no reference on its upper inode %d", n.ino, n.upper)
		}
		n.mu.Lock()
		subdirs, known := n.subdirs, n.subdirsKnown
		n.mu.Unlock()
		if known && n.upper != 0 && n.hasLower && n.parent != nil || known && n == fs.root {
			if c, err := fs.countSubdirsLocked(n); err == nil && c != subdirs {
				return fmt.Errorf("node %#x keeps %d subdirectories, shows %d", n.ino, subdirs, c)
			}
		}
	}
	return fs.upper.CheckInvariants()
}

// errnoOf converts an error to a bare syscall.Errno (memfs.Errno).
var errnoOf = memfs.Errno

func nativeUint16(b []byte) uint16 { return binary.NativeEndian.Uint16(b) }
func nativeUint64(b []byte) uint64 { return binary.NativeEndian.Uint64(b) }

// upperNames lists the names in the upper directory ino, "." and ".."
// left out.
func (fs *FS) upperNames(ino uint64) ([]string, error) {
	d, err := fs.upper.OpenDir(ino)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	var names []string
	err = d.ReadDir(0, func(e *vfs.DirEntry) bool {
		if e.Name != "." && e.Name != ".." {
			names = append(names, e.Name)
		}
		return true
	})
	return names, err
}
