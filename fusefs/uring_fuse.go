package fusefs

import (
	"encoding/binary"
	"fmt"
	"os"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// FUSE over io_uring (Linux >= 6.14, fs/fuse/dev_uring.c): the ring
// transport beside the /dev/fuse loop of session.go. Once INIT has
// negotiated FUSE_OVER_IO_URING and every queue has an entry registered,
// the kernel stops queueing requests on /dev/fuse and hands each one to
// an entry of the queue of the caller's CPU; the server answers it and
// takes the next in one COMMIT_AND_FETCH, one io_uring_enter, with no
// read(2) or write(2) and no thread wake-up besides the queue's own.
// INIT, FORGET, BATCH_FORGET and INTERRUPT stay on /dev/fuse, so the
// session's readers stay too.
//
// Each queue is one goroutine locked to its OS thread (a ring takes
// submissions from one task: IORING_SETUP_SINGLE_ISSUER), pinned to its
// CPU where the CPU is online, serving its entries one after another with
// go-fuse's ProtocolServer straight from and into the entries' buffers.
// Those are mapped outside the Go heap (the kernel writes them while the
// thread waits) and reused; nothing is allocated per request on our side.
// A handler served here must not wait for another FUSE request of the same
// mount: the queue's other requests wait behind it (rawFS.grace: opens and
// seals that would wait for a RELEASE do not, on the ring).
//
// A ring-served connection cannot change server (docs/restart.md): Session
// and Stop refuse it, Adopt refuses a recorded INIT that chose the ring.

// FUSE-over-io_uring ABI (include/uapi/linux/fuse.h).
const (
	uringCmdRegister       = 1
	uringCmdCommitAndFetch = 2
	// uringHeaderSize is sizeof(struct fuse_uring_req_header): the
	// fuse_in_header or fuse_out_header (in a 128-byte area), the
	// operation's own header (128 bytes), then struct
	// fuse_uring_ent_in_out (flags, commit_id, payload_sz).
	uringHeaderSize  = 288
	uringOpInOffset  = 128
	uringCommitIDOff = 256 + 8
	uringPayloadOff  = 256 + 16
	uringOpInMax     = 128

	// ringEntries is how many requests a queue can hold at once. One
	// thread serves them in turn; more than one lets it answer a burst
	// in one system call.
	ringEntries = 4
)

// ringQueue is one queue of the connection's ring and the thread serving
// it. All fields are touched only by that thread, after newRingQueue.
type ringQueue struct {
	qid int
	dev int
	// stopFd is the transport's (ringTransport.stopFd).
	stopFd int
	// sess is the session the ring serves: its ProtocolServer, request
	// counts and panic recovery (serveVec), as for /dev/fuse.
	sess *session
	name string
	ring *uring
	// mem holds every entry's header and payload buffers.
	mem  []byte
	ents [ringEntries]ringEntry
	// live counts entries the kernel holds (registered and not ended).
	live int
	// stopped is set when stopFd has become readable.
	stopped bool
}

// ringEntry is one ring entry's buffers and the iovecs that go-fuse reads
// a request from and writes the reply into (kept here, so that building
// them allocates nothing).
type ringEntry struct {
	hdr, payload []byte
	// iov is what REGISTER gives the kernel: hdr, then payload.
	iov [2]unix.Iovec
	in  [3][]byte
	out [2][]byte
}

// ringTransport is the set of a connection's queues.
type ringTransport struct {
	// stopFd is an eventfd that close makes readable, which every queue
	// polls. Immutable; closed by close.
	stopFd int
	// wg counts queue threads running.
	wg sync.WaitGroup
}

// stopUserData marks the completion of a queue's poll of stopFd.
const stopUserData = ^uint64(0)

// possibleCPUs returns how many CPUs the kernel may ever run, which is the
// ring's number of queues (num_possible_cpus in fuse_uring_create).
func possibleCPUs() (int, error) {
	b, err := os.ReadFile("/sys/devices/system/cpu/possible")
	if err != nil {
		return 0, err
	}
	n := 0
	for _, part := range strings.Split(strings.TrimSpace(string(b)), ",") {
		lo, hi, found := strings.Cut(part, "-")
		a, err := strconv.Atoi(lo)
		if err != nil {
			return 0, fmt.Errorf("parsing possible CPUs %q: %w", b, err)
		}
		z := a
		if found {
			if z, err = strconv.Atoi(hi); err != nil {
				return 0, fmt.Errorf("parsing possible CPUs %q: %w", b, err)
			}
		}
		n += z - a + 1
	}
	return n, nil
}

// startRing registers ringEntries entries on every queue of the
// connection and serves them. init is the INIT reply, which sizes the
// payload buffers as the kernel wants them (fuse_uring_create). On error
// nothing is left registered: the kernel serves the connection on
// /dev/fuse again (a failed REGISTER clears fc->io_uring).
func startRing(s *session, init fuse.InitOut) (*ringTransport, error) {
	n, err := possibleCPUs()
	if err != nil {
		return nil, err
	}
	payload := max(8192, int(init.MaxWrite), max(int(init.MaxPages), 32)*os.Getpagesize())
	stopFd, err := unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	if err != nil {
		return nil, err
	}
	t := &ringTransport{stopFd: stopFd}
	ready := make(chan error, n)
	for qid := range n {
		q := &ringQueue{qid: qid, dev: s.devFd, stopFd: stopFd, sess: s, name: s.raw.opts.FsName}
		t.wg.Add(1)
		go q.run(payload, ready, &t.wg)
	}
	for range n {
		if e := <-ready; e != nil && err == nil {
			err = e
		}
	}
	if err != nil {
		t.close()
		return nil, err
	}
	return t, nil
}

// disarmRing has the kernel serve a connection whose ring did not start
// on /dev/fuse after all: a REGISTER it refuses (a queue out of range)
// clears fc->io_uring (fuse_uring_cmd), where a ring never ready would
// hold every request back (fuse_block_alloc in fs/fuse/dev.c).
func disarmRing(dev int) error {
	r, err := newURing(2)
	if err != nil {
		return err
	}
	defer r.close()
	cmd := r.uringCmd(dev, uringCmdRegister, 0, 2, 0)
	binary.LittleEndian.PutUint16(cmd[16:], ^uint16(0))
	if err := r.enter(false); err != nil {
		return os.NewSyscallError("io_uring_enter", err)
	}
	r.completions(func(_ uint64, res int32) {
		// EOPNOTSUPP: the connection's ring is off already.
		if e := syscall.Errno(-res); e != unix.EINVAL && e != unix.EOPNOTSUPP {
			err = fmt.Errorf("an invalid FUSE_IO_URING_CMD_REGISTER: %w", e)
		}
	})
	return err
}

// close ends every queue and waits for their threads: each closes its
// ring, and the kernel cancels the entries still registered
// (fuse_uring_cancel). Only for a connection that has ended, or whose
// ring never served (startRing failed): an entry cancelled while the
// connection lives can strand a request (docs/restart.md).
func (t *ringTransport) close() {
	one := [8]byte{1}
	unix.Write(t.stopFd, one[:])
	t.wg.Wait()
	unix.Close(t.stopFd)
}

// run is a queue's thread: it registers the entries, reports on ready,
// then serves until every entry has ended.
func (q *ringQueue) run(payload int, ready chan<- error, wg *sync.WaitGroup) {
	defer wg.Done()
	// Never unlocked: the thread, pinned to a CPU, ends with the
	// goroutine instead of going back to the runtime's pool.
	runtime.LockOSThread()
	var set unix.CPUSet
	set.Set(q.qid)
	// An offline CPU refuses; the queue is then served from anywhere.
	unix.SchedSetaffinity(0, &set)

	err := q.setup(payload)
	ready <- err
	if err != nil {
		return
	}
	q.serve()
}

// setup maps the buffers, makes the ring and registers every entry. It
// returns the first error the kernel reports for a REGISTER (they fail
// at submission, so their completions are there when enter returns).
func (q *ringQueue) setup(payload int) error {
	size := ringEntries * (uringHeaderSize + payload)
	mem, err := unix.Mmap(-1, 0, size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_PRIVATE|unix.MAP_ANONYMOUS)
	if err != nil {
		return fmt.Errorf("mapping ring buffers: %w", err)
	}
	q.mem = mem
	if q.ring, err = newURing(2 * ringEntries); err != nil {
		return err
	}
	for i := range q.ents {
		e := &q.ents[i]
		off := i * (uringHeaderSize + payload)
		e.hdr = mem[off : off+uringHeaderSize : off+uringHeaderSize]
		e.payload = mem[off+uringHeaderSize : off+uringHeaderSize+payload : off+uringHeaderSize+payload]
		e.iov[0] = unix.Iovec{Base: &e.hdr[0]}
		e.iov[0].SetLen(len(e.hdr))
		e.iov[1] = unix.Iovec{Base: &e.payload[0]}
		e.iov[1].SetLen(len(e.payload))
		q.register(i)
	}
	q.ring.pollIn(q.stopFd, stopUserData)
	if err := q.enterRetry(false); err != nil {
		return os.NewSyscallError("io_uring_enter", err)
	}
	q.ring.completions(func(ud uint64, res int32) {
		if ud == stopUserData {
			q.stopped = true
			return
		}
		if err == nil {
			err = fmt.Errorf("FUSE_IO_URING_CMD_REGISTER on queue %d: %w", q.qid, syscall.Errno(-res))
		}
		q.live--
	})
	return err
}

// register submits entry i's REGISTER (on the next enter).
func (q *ringQueue) register(i int) {
	cmd := q.ring.uringCmd(q.dev, uringCmdRegister, uintptr(unsafe.Pointer(&q.ents[i].iov[0])), 2, uint64(i))
	binary.LittleEndian.PutUint16(cmd[16:], uint16(q.qid))
	q.live++
}

// commit submits entry i's COMMIT_AND_FETCH of the request commitID.
func (q *ringQueue) commit(i int, commitID uint64) {
	cmd := q.ring.uringCmd(q.dev, uringCmdCommitAndFetch, 0, 0, uint64(i))
	binary.LittleEndian.PutUint64(cmd[8:], commitID)
	binary.LittleEndian.PutUint16(cmd[16:], uint16(q.qid))
}

// enterRetry is enter, retried on EINTR.
func (q *ringQueue) enterRetry(wait bool) error {
	for {
		if err := q.ring.enter(wait); err != unix.EINTR {
			return err
		}
	}
}

// serve answers requests until every entry has ended or the transport
// closes, then lets go of the ring and the buffers.
func (q *ringQueue) serve() {
	defer func() {
		q.ring.close()
		unix.Munmap(q.mem)
	}()
	for q.live > 0 && !q.stopped {
		if err := q.enterRetry(true); err != nil {
			klog.ErrorS(os.NewSyscallError("io_uring_enter", err), "Serving a FUSE ring queue failed", "fsName", q.name, "qid", q.qid)
			return
		}
		q.ring.completions(q.complete)
	}
}

// complete handles one completion of entry i: a request to serve, or the
// entry's end.
func (q *ringQueue) complete(ud uint64, res int32) {
	if ud == stopUserData {
		q.stopped = true
		return
	}
	i := int(ud)
	if res < 0 {
		switch errno := syscall.Errno(-res); errno {
		case unix.ENOTCONN, unix.ECONNABORTED, unix.ECANCELED:
			// The connection ended or is ending (fuse_uring_stop_queues,
			// fuse_uring_cancel): the entry is gone.
			q.live--
		default:
			// A refused commit leaves the entry with the kernel, out of
			// service: give it the buffers again as a new entry.
			klog.ErrorS(errno, "A FUSE ring entry failed; registering it again", "fsName", q.name, "qid", q.qid)
			q.live--
			q.register(i)
		}
		return
	}
	e := &q.ents[i]
	commitID := binary.LittleEndian.Uint64(e.hdr[uringCommitIDOff:])
	q.serveEntry(e, commitID)
	q.commit(i, commitID)
}

// serveEntry serves the request in e and leaves its reply there: the
// fuse_out_header in the header area and the rest in the payload.
//
// The kernel puts the fuse_in_header first, the operation's header (its
// first argument; the length is what the request's length leaves beside
// the payload) at uringOpInOffset, and the other arguments in the
// payload. go-fuse reads these as one stream. The reply may overwrite the
// request's payload, which go-fuse has parsed (names copied) before the
// handler writes.
func (q *ringQueue) serveEntry(e *ringEntry, commitID uint64) {
	total := int(binary.LittleEndian.Uint32(e.hdr[0:]))
	psz := int(binary.LittleEndian.Uint32(e.hdr[uringPayloadOff:]))
	op := total - inHeaderSize - psz
	w := 0
	if op >= 0 && op <= uringOpInMax && psz <= len(e.payload) {
		e.in = [3][]byte{e.hdr[:inHeaderSize], e.hdr[uringOpInOffset : uringOpInOffset+op], e.payload[:psz]}
		e.out = [2][]byte{e.hdr[:outHeaderSize], e.payload}
		q.sess.counts.add(e.hdr)
		var st fuse.Status
		w, st = q.sess.serveVec(e.in[:], e.out[:])
		if !st.Ok() {
			klog.ErrorS(syscall.Errno(st), "Malformed FUSE request", "fsName", q.name, "bytes", total)
			w = 0
		}
	}
	if w < outHeaderSize {
		// Every request on the ring takes a reply; one go-fuse could
		// not parse, or that took none, fails.
		w = errorReply(e.hdr, commitID, syscall.EIO)
	}
	binary.LittleEndian.PutUint32(e.hdr[uringPayloadOff:], uint32(w-outHeaderSize))
}
