package fusefs

import (
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"unsafe"

	"golang.org/x/sys/unix"
)

// The open-handle table. The kernel names every open file and directory by
// the handle (fh) this server gave it, and keeps using it across a change
// of server process. So a successor must know what every fh means: each
// handle has a record in a memory file (memfd) that outlives the process
// (the driver hands it to the next server, and a holder keeps a copy for
// crashes). A record says what to reopen: the inode, the open flags, and
// the passthrough backing file the kernel does the I/O on. The fh is the
// record's index plus one. A file's record also names the tmpfs inode of its
// data, so that a file removed while open (or an O_TMPFILE) is found again:
// the kernel's passthrough backing file keeps that inode alive.
//
// Records are written before the reply that gives the kernel the fh, and
// cleared at RELEASE. A server that dies between the two leaves a record
// the kernel never learned (the request is resent and gets another fh):
// the successor reopens it for nothing, and the file stays open until the
// volume is unmounted. That costs a descriptor, not data.

// maxHandles bounds the open files and directories of one connection.
const maxHandles = 1 << 16

// Record kinds.
const (
	recFree = iota
	recFile
	recDir
	// recBacking is a passthrough backing registration kept past its
	// inode's last open (rawFS.backing): Ino, BackingID, BackingDev and
	// BackingIno, Backed 0. No request names its fh.
	recBacking
)

// maxRecordedBacking bounds the recBacking records, so that opens keep
// most of the table.
const maxRecordedBacking = maxHandles / 8

// handleRecord is one record of the table, as stored (64 bytes).
type handleRecord struct {
	// Kind is recFree, recFile, recDir or recBacking. Written last (atomically) when
	// a record is made, first when it is cleared.
	Kind uint32
	// Flags are a file's open(2) flags.
	Flags uint32
	// Ino is the inode number (node id).
	Ino uint64
	// Backed is 1 when the open does its I/O by passthrough on the
	// inode's backing file, BackingID, whose identity is BackingDev and
	// BackingIno.
	Backed     uint32
	BackingID  int32
	BackingDev uint64
	BackingIno uint64
	// HasData is 1 when DataIno and DataGen name the tmpfs inode that
	// holds the file's bytes (vfs.HandleFile): a successor finds the file by
	// them when it has no name (vfs.OrphanFinder). Records of older servers
	// have 0 here.
	HasData uint32
	DataGen uint32
	DataIno uint64
	_       [8]byte
}

const recordSize = int(unsafe.Sizeof(handleRecord{}))

// handleTable is the table of a connection's open handles.
type handleTable struct {
	// file is the memory file of the records. Immutable.
	file *os.File
	// mem maps file: maxHandles records. Immutable.
	mem []byte

	// mu protects open, free and next.
	mu sync.Mutex
	// open maps each fh in use to its *openFile, vfs.Dir or *deadHandle.
	// Invariant: fh is in open exactly when its record's Kind is not
	// recFree (apart from the moments add and remove write it).
	open map[uint64]any
	// free holds fhs below next that are not in use.
	free []uint64
	// next is the lowest fh never used.
	next uint64
}

// recordedBacking stands, in the handle table, for the recBacking record
// of ino's backing registration.
type recordedBacking struct{ ino uint64 }

// deadHandle stands for a handle a successor could not reopen (its file
// was removed while open and nothing kept it, for example). Requests on it
// fail with EIO until the kernel releases it.
type deadHandle struct {
	ino uint64
	// backed says the handle holds a reference on ino's backing file.
	backed bool
	// rdwr says the handle reads and writes through passthrough, so a
	// shared mapping of it can store unseen (counted in rawFS.rdwr).
	rdwr bool
}

// newHandleTable makes an empty table in a new memory file.
func newHandleTable() (*handleTable, error) {
	fd, err := unix.MemfdCreate("csi-memfs-handles", unix.MFD_CLOEXEC)
	if err != nil {
		return nil, fmt.Errorf("handle table: %w", err)
	}
	if err := unix.Ftruncate(fd, int64(maxHandles*recordSize)); err != nil {
		unix.Close(fd)
		return nil, fmt.Errorf("handle table: %w", err)
	}
	return mapHandleTable(os.NewFile(uintptr(fd), "csi-memfs-handles"))
}

// mapHandleTable maps the table file f, which it now owns.
func mapHandleTable(f *os.File) (*handleTable, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(f.Fd()), &st); err != nil {
		f.Close()
		return nil, fmt.Errorf("handle table: %w", err)
	}
	if st.Size != int64(maxHandles*recordSize) {
		f.Close()
		return nil, fmt.Errorf("handle table: %d bytes, want %d", st.Size, maxHandles*recordSize)
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, maxHandles*recordSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, fmt.Errorf("handle table: %w", err)
	}
	return &handleTable{file: f, mem: mem, open: map[uint64]any{}, next: 1}, nil
}

// record returns the record of fh.
func (t *handleTable) record(fh uint64) *handleRecord {
	return (*handleRecord)(unsafe.Pointer(&t.mem[(fh-1)*uint64(recordSize)]))
}

// add records rec, registers h under a new fh and returns it; EMFILE when
// the table is full.
func (t *handleTable) add(h any, rec handleRecord) (uint64, error) {
	t.mu.Lock()
	defer t.mu.Unlock()
	var fh uint64
	if n := len(t.free); n > 0 {
		fh, t.free = t.free[n-1], t.free[:n-1]
	} else if t.next <= maxHandles {
		fh = t.next
		t.next++
	} else {
		return 0, syscall.EMFILE
	}
	kind := rec.Kind
	rec.Kind = recFree
	p := t.record(fh)
	*p = rec
	atomic.StoreUint32(&p.Kind, kind)
	t.open[fh] = h
	return fh, nil
}

// get returns what fh stands for, or nil.
func (t *handleTable) get(fh uint64) any {
	t.mu.Lock()
	defer t.mu.Unlock()
	return t.open[fh]
}

// remove clears fh and returns what it stood for, or nil.
func (t *handleTable) remove(fh uint64) any {
	t.mu.Lock()
	defer t.mu.Unlock()
	h, ok := t.open[fh]
	if !ok {
		return nil
	}
	delete(t.open, fh)
	atomic.StoreUint32(&t.record(fh).Kind, recFree)
	t.free = append(t.free, fh)
	return h
}

// restore rebuilds the table from the records a previous server left,
// calling reopen for each; what reopen returns is registered under the
// record's fh. Only the parts of the file that were ever written are read
// (SEEK_DATA): reading a hole of a memory file would allocate it.
func (t *handleTable) restore(reopen func(fh uint64, rec handleRecord) any) error {
	t.mu.Lock()
	defer t.mu.Unlock()
	fd := int(t.file.Fd())
	size := int64(maxHandles * recordSize)
	last := uint64(0)
	for off := int64(0); off < size; {
		start, err := unix.Seek(fd, off, unix.SEEK_DATA)
		if err == unix.ENXIO {
			break // no data past off
		}
		if err != nil {
			return fmt.Errorf("handle table: %w", err)
		}
		end, err := unix.Seek(fd, start, unix.SEEK_HOLE)
		if err != nil {
			return fmt.Errorf("handle table: %w", err)
		}
		for fh := uint64(start)/uint64(recordSize) + 1; fh <= uint64(end)/uint64(recordSize); fh++ {
			rec := *t.record(fh)
			if rec.Kind == recFree {
				continue
			}
			t.open[fh] = reopen(fh, rec)
			for f := last + 1; f < fh; f++ {
				t.free = append(t.free, f)
			}
			last = fh
		}
		off = end
	}
	t.next = last + 1
	return nil
}

// dup returns a new descriptor of the table's file, for a successor.
func (t *handleTable) dup() (*os.File, error) {
	fd, err := unix.FcntlInt(t.file.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(fd), "csi-memfs-handles"), nil
}

// close unmaps the table and closes its file. Other processes' copies of
// the file keep the records.
func (t *handleTable) close() {
	unix.Munmap(t.mem)
	t.file.Close()
}
