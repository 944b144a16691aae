package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"runtime/debug"
	"sync"
	"sync/atomic"
	"syscall"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// The serving loop. A session owns one FUSE connection's /dev/fuse
// descriptor and serves it with go-fuse's ProtocolServer, which turns one
// request into calls on rawFS and one reply. It is our loop and not
// go-fuse's fuse.Server because a connection must outlive the process that
// serves it (docs/restart.md): fuse.Server insists on reading the kernel's
// INIT itself, and the kernel sends INIT once per connection. Here INIT is
// just a request: the first server answers it and records it, and a
// successor replays the record into its own ProtocolServer and drops the
// reply (restart.go).
//
// Readers wait in an epoll set of the session's own: the device is
// non-blocking (a successor and the holder share its open file
// description), so a reader reads until EAGAIN and then sleeps in
// epoll_wait. The set holds the device edge-triggered, one waiter woken
// per request, and an eventfd, level-triggered, that stop makes readable
// to wake every waiter at once.
//
// Design rule: readers block in epoll_wait on our own set, never in the Go
// runtime's poller (why, with figures: BENCHMARKS.md, "Notes behind the
// serving loop").

// FUSE protocol constants go-fuse does not export
// (include/uapi/linux/fuse.h).
const (
	opInit = 26
	// notifyResend is FUSE_NOTIFY_RESEND (Linux >= 6.9): the kernel queues
	// again every request it sent and has had no reply to.
	notifyResend = 7
	// uniqueResend is FUSE_UNIQUE_RESEND, set on the unique of a request
	// the kernel queued again.
	uniqueResend = 1 << 63

	// FUSE_DEV_IOC_BACKING_OPEN and _CLOSE.
	iocBackingOpen  = 0x4010e501
	iocBackingClose = 0x4004e502

	// maxReaders bounds the goroutines of one session reading requests.
	maxReaders = 16
	// ringDevPause is how long a reader of a ring-served connection
	// waits, having emptied the device, before it reads again and only
	// then sleeps in epoll_wait.
	ringDevPause = time.Millisecond
)

// errStopped is what a read returns once stop has begun; errSurplus, to
// a reader that may end because two others wait.
var (
	errStopped = errors.New("fusefs: session stopped")
	errSurplus = errors.New("fusefs: surplus reader")
)

// session serves one FUSE connection.
type session struct {
	// devFd is the connection's /dev/fuse descriptor, non-blocking.
	// Immutable; closed by close, once no reader runs.
	devFd int
	// epFd is the readers' epoll set: devFd edge-triggered and stopFd
	// level-triggered. Immutable; closed by close.
	epFd int
	// stopFd is an eventfd that stop makes readable for good. Immutable;
	// closed by close.
	stopFd int
	ps     *fuse.ProtocolServer
	raw    *rawFS
	// ring is the connection's io_uring transport (uring_fuse.go), or
	// nil when every request comes through devFd. Set before serving;
	// immutable after.
	ring *ringTransport
	// init is the INIT request the kernel sent followed by the reply it
	// got, verbatim (the request's header gives its length). Set before
	// serving; immutable after.
	init []byte
	// bufSize is the size of request and reply buffers: the largest
	// request (a WRITE of max_write) or reply (a READ of max_read) with
	// their headers, and room for xattr values. Immutable.
	bufSize int

	// stopping is set once stop has begun (before stopFd is written):
	// readers finish the request they hold and end.
	stopping atomic.Bool
	// idle counts readers waiting for a request; readers counts all.
	// Readers keep idle <= readers <= maxReaders (a moment's excess is
	// harmless).
	idle, readers atomic.Int32
	// taken counts the requests readers have taken, waits the waits for
	// one they ended (having found the queue empty), and callerChanges
	// the requests whose caller (the thread, by id) was not the previous
	// request's, for the watch (readers.go). lastCaller is that previous
	// caller; requests that name none (pid 0: FORGETs, and what the
	// kernel sends without credentials) leave both alone.
	taken, waits, callerChanges atomic.Uint64
	lastCaller                  atomic.Uint32
	// stuckHelpers and saturatedHelpers count the readers the watch
	// started, by why.
	stuckHelpers, saturatedHelpers atomic.Uint64
	// spawnMu orders addReader against wakeAll.
	spawnMu sync.Mutex
	// endMu protects endErr.
	endMu sync.Mutex
	// endErr is why serving ended, if not stop: nil when the connection
	// ended (unmounted).
	endErr error
	// wg counts running readers.
	wg sync.WaitGroup
	// done is closed when the last reader has ended.
	done chan struct{}
	// panics counts requests whose handler panicked. Accessed atomically.
	panics atomic.Uint64
	// counts counts the requests read, by operation.
	counts opCounts
	// backingOpens and backingCloses count the passthrough backing
	// registrations made and dropped (FUSE_DEV_IOC_BACKING_OPEN and
	// _CLOSE), successful or not: what rawFS.backing saves.
	backingOpens, backingCloses atomic.Uint64

	// interruptsOff says the kernel took this server's ENOSYS to an
	// INTERRUPT and sends no more on the connection (declineInterrupt).
	interruptsOff atomic.Bool

	// testHook, set by tests, sees every request: with skip the request
	// is dropped unserved, with noReply it is served and its reply
	// dropped, as a server that dies at that point would.
	testHook atomic.Pointer[func(in []byte) (skip, noReply bool)]
}

// bufPool holds request and reply buffers of every session.
var bufPool sync.Pool

// getBuf returns a buffer of exactly bufSize bytes: the kernel refuses a
// read into less than max_write plus headers, and a bigger pooled buffer
// must not hide a session's wrong size.
func (s *session) getBuf() *[]byte {
	if b, ok := bufPool.Get().(*[]byte); ok && cap(*b) >= s.bufSize {
		*b = (*b)[:s.bufSize]
		return b
	}
	b := make([]byte, s.bufSize)
	return &b
}

// newSession makes a session that serves raw on devFd, a /dev/fuse
// descriptor it now owns (closed here on failure).
func newSession(devFd int, raw *rawFS, mo *fuse.MountOptions) (*session, error) {
	// go-fuse recovers a handler's panic and asks PanicHandler for the
	// status; ours panics on, with the stack, to serveRequest, which knows
	// the request.
	psOpts := *mo
	psOpts.PanicHandler = func(v any) fuse.Status { panic(handlerPanic{value: v, stack: debug.Stack()}) }
	s := &session{
		devFd:   devFd,
		epFd:    -1,
		stopFd:  -1,
		ps:      fuse.NewProtocolServer(raw, &psOpts),
		raw:     raw,
		bufSize: mo.MaxWrite + 64<<10 + 4096,
		done:    make(chan struct{}),
	}
	err := unix.SetNonblock(devFd, true)
	if err == nil {
		s.epFd, err = unix.EpollCreate1(unix.EPOLL_CLOEXEC)
	}
	if err == nil {
		s.stopFd, err = unix.Eventfd(0, unix.EFD_CLOEXEC|unix.EFD_NONBLOCK)
	}
	if err == nil {
		err = unix.EpollCtl(s.epFd, unix.EPOLL_CTL_ADD, devFd,
			&unix.EpollEvent{Events: unix.EPOLLIN | unix.EPOLLET, Fd: int32(devFd)})
	}
	if err == nil {
		err = unix.EpollCtl(s.epFd, unix.EPOLL_CTL_ADD, s.stopFd,
			&unix.EpollEvent{Events: unix.EPOLLIN, Fd: int32(s.stopFd)})
	}
	if err != nil {
		s.close()
		return nil, fmt.Errorf("setting up the FUSE connection's readers: %w", err)
	}
	raw.dev = s
	return s, nil
}

// close closes the session's descriptors. No reader may be running.
func (s *session) close() {
	for _, fd := range []int{s.stopFd, s.epFd, s.devFd} {
		if fd >= 0 {
			unix.Close(fd)
		}
	}
}

// readInit reads the connection's first request, which must be INIT,
// answers it, and records it.
func (s *session) readInit() error {
	buf := make([]byte, s.bufSize)
	n, err := s.read(buf)
	if err != nil {
		return fmt.Errorf("reading INIT: %w", err)
	}
	if n < 8 || binary.LittleEndian.Uint32(buf[4:]) != opInit {
		return fmt.Errorf("the first request is not INIT (%d bytes)", n)
	}
	s.counts.add(buf[:n])
	out := make([]byte, s.bufSize)
	w, st := s.serveRequest(buf[:n], out)
	if !st.Ok() || w == 0 {
		return fmt.Errorf("answering INIT: %v", st)
	}
	if _, err := unix.Write(s.devFd, out[:w]); err != nil {
		return fmt.Errorf("replying to INIT: %w", err)
	}
	s.init = append(append([]byte(nil), buf[:n]...), out[:w]...)
	io, err := parseInitReply(out[:w])
	if err != nil {
		return err
	}
	s.raw.negotiated(io.Flags64())
	return nil
}

// parseInitReply parses an INIT reply (with its fuse_out_header).
func parseInitReply(out []byte) (fuse.InitOut, error) {
	var io fuse.InitOut
	if len(out) < outHeaderSize+int(unsafe.Sizeof(io)) {
		return io, fmt.Errorf("INIT reply of %d bytes", len(out))
	}
	if errno := int32(binary.LittleEndian.Uint32(out[4:])); errno != 0 {
		return io, fmt.Errorf("INIT refused: %v", syscall.Errno(-errno))
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&io)), unsafe.Sizeof(io)), out[outHeaderSize:])
	return io, nil
}

// read reads one request into buf, waiting for one if none is queued.
// It returns errStopped once stop has begun and no request is queued.
// The caller counts itself in idle; if, with none queued, another reader
// waits too, read takes it out of idle and returns errSurplus.
//
// A reader ends only here, having found the queue empty: the device is
// edge-triggered, so a reader that ended with a request queued, whose
// wake-up another waiter had already taken, would strand it.
func (s *session) read(buf []byte) (int, error) {
	var ev [1]unix.EpollEvent
	paused := false
	for {
		n, err := unix.Read(s.devFd, buf)
		switch err {
		case nil:
			return n, nil
		case unix.EINTR, unix.ENOENT:
			// A signal; or the request was interrupted and withdrawn
			// while being read.
		case unix.EAGAIN:
			// Edge-triggered: a request queued since the read above
			// makes the wait return, so none is missed.
			if s.stopping.Load() {
				return 0, errStopped
			}
			if v := s.idle.Load(); v > 1 && s.idle.CompareAndSwap(v, v-1) {
				return 0, errSurplus
			}
			if s.ring != nil && !paused {
				// On the ring, only FORGET, BATCH_FORGET and
				// INTERRUPT come here: let the FORGETs of an unlink
				// or eviction storm gather into one BATCH_FORGET
				// instead of waking a reader for each (figures:
				// BENCHMARKS.md, "FUSE over io_uring").
				paused = true
				time.Sleep(ringDevPause)
			} else {
				paused = false
				if _, err := unix.EpollWait(s.epFd, ev[:], -1); err != nil && err != unix.EINTR {
					return 0, os.NewSyscallError("epoll_wait", err)
				}
			}
			// Counted once the wait ends: a reader that waited at the
			// watch's last look was not busy all along since.
			s.waits.Add(1)
		default:
			return 0, err
		}
	}
}

// serve starts the readers; done is closed when they have all ended.
func (s *session) serve() {
	s.readers.Store(1)
	s.wg.Add(1)
	watch.add(s)
	go s.reader()
	go func() {
		s.wg.Wait()
		watch.remove(s)
		s.endMu.Lock()
		err := s.endErr
		s.endMu.Unlock()
		if err := s.counts.writeCountsFile(); err != nil {
			klog.ErrorS(err, "Writing FUSE request counts", "fsName", s.raw.opts.FsName)
		}
		if err != nil {
			// Requests now wait for a successor (or the holder's EIO).
			klog.ErrorS(err, "Serving a FUSE connection failed; no longer reading it", "fsName", s.raw.opts.FsName)
		}
		close(s.done)
	}()
}

// reader reads and serves requests until the connection ends or stop. A
// session starts with one; the watch adds helpers while requests are slow,
// and a reader that finds no request while another waits ends
// (readers.go).
func (s *session) reader() {
	defer s.wg.Done()
	defer s.readers.Add(-1)
	in := s.getBuf()
	defer bufPool.Put(in)
	for !s.stopping.Load() {
		s.idle.Add(1)
		n, err := s.read(*in)
		if err == errSurplus {
			return // read took it out of idle
		}
		if err == nil {
			// Before idle: the watch must not see a reader busy and
			// no request taken.
			s.taken.Add(1)
			if n >= inHeaderSize {
				// Loaded first: a lone caller's requests write nothing.
				if pid := binary.LittleEndian.Uint32((*in)[32:]); pid != 0 && s.lastCaller.Load() != pid {
					s.lastCaller.Store(pid)
					s.callerChanges.Add(1)
				}
			}
		}
		idle := s.idle.Add(-1)
		if err != nil {
			if err != errStopped {
				// ENODEV: the connection ended (unmounted);
				// ECONNABORTED: it was aborted (abortConnection).
				if err != syscall.ENODEV && err != syscall.ECONNABORTED {
					s.endMu.Lock()
					if s.endErr == nil {
						s.endErr = err
					}
					s.endMu.Unlock()
				}
				// The device reported its end once, edge-triggered, to
				// one waiter: wake the others.
				s.wakeAll()
			}
			return
		}
		if idle == 0 {
			watch.busy()
		}
		s.handle((*in)[:n])
	}
}

// handle serves one request and writes its reply, if it takes one.
func (s *session) handle(in []byte) {
	s.counts.add(in)
	var noReply bool
	if h := s.testHook.Load(); h != nil {
		var skip bool
		if skip, noReply = (*h)(in); skip {
			return
		}
	}
	if len(in) >= inHeaderSize && binary.LittleEndian.Uint32(in[4:]) == opInterrupt {
		if !noReply {
			s.declineInterrupt(in)
		}
		return
	}
	outp := s.getBuf()
	defer bufPool.Put(outp)
	out := *outp
	w, st := s.serveRequest(in, out)
	if noReply {
		return
	}
	if !st.Ok() {
		klog.ErrorS(syscall.Errno(st), "Malformed FUSE request", "fsName", s.raw.opts.FsName, "bytes", len(in))
		return
	}
	if w == 0 {
		return
	}
	s.reply(out[:w])
}

// reply writes the reply out to /dev/fuse and says whether the kernel took
// it. ENOENT (the request was answered or given up already) and ENODEV
// (the connection ended) are expected; anything else is a malformed
// reply, a bug, and is logged.
func (s *session) reply(out []byte) bool {
	_, err := unix.Write(s.devFd, out)
	if err != nil && err != syscall.ENOENT && err != syscall.ENODEV {
		klog.ErrorS(err, "Writing a FUSE reply", "fsName", s.raw.opts.FsName)
	}
	return err == nil
}

// declineInterrupt answers the INTERRUPT request in with ENOSYS. No
// handler here blocks or watches for cancellation, so an interrupted
// request is answered as it would have been: an INTERRUPT carries nothing
// this server can use. The kernel takes ENOSYS as "never send them again"
// for the connection (fc->no_interrupt) once a reply finds the
// interrupted request still in flight; one that comes after the
// request's own reply fails with ENOENT (reply), and a later INTERRUPT
// tries again. Fatal signals end a caller's wait for a request not yet read
// with or without interrupts.
//
// Left to go-fuse, an INTERRUPT was answered EAGAIN (its table of
// requests in flight is its own loop's, which this one does not use), and
// the kernel queues an INTERRUPT answered so again at once: a signalled
// caller had the server spinning on INTERRUPTs until its request was
// answered (TestInterruptDeclined counted 272 for two requests held a few
// milliseconds), and a Go client, whose runtime preempts its threads with
// signals, drew thousands in a metadata run (BENCHMARKS.md).
func (s *session) declineInterrupt(in []byte) {
	var out [outHeaderSize]byte
	errorReply(out[:], binary.LittleEndian.Uint64(in[8:]), syscall.ENOSYS)
	if s.reply(out[:]) {
		s.interruptsOff.Store(true)
	}
}

// handlerPanic is a panic of a request handler and the stack it was
// raised on.
type handlerPanic struct {
	value any
	stack []byte
}

// serveRequest serves the request in and writes its reply to out, as
// ProtocolServer.HandleRequest does. A panic while serving is recovered:
// logged once with the request's opcode and node id, counted, and answered
// EIO (or not answered, for a request that takes no reply).
func (s *session) serveRequest(in, out []byte) (w int, st fuse.Status) {
	return s.serveVec([][]byte{in}, [][]byte{out})
}

// serveVec is serveRequest for a request and a reply held in several
// buffers, the fuse_in_header and fuse_out_header at the start of the
// first (the io_uring transport's entries).
func (s *session) serveVec(in, out [][]byte) (w int, st fuse.Status) {
	defer func() {
		r := recover()
		if r == nil {
			return
		}
		p, ok := r.(handlerPanic)
		if !ok {
			p = handlerPanic{value: r, stack: debug.Stack()}
		}
		s.panics.Add(1)
		var op uint32
		var unique, node uint64
		if hdr := in[0]; len(hdr) >= inHeaderSize {
			op = binary.LittleEndian.Uint32(hdr[4:])
			unique = binary.LittleEndian.Uint64(hdr[8:])
			node = binary.LittleEndian.Uint64(hdr[16:])
		}
		klog.ErrorS(nil, "FUSE request handler panicked; answered EIO", "fsName", s.raw.opts.FsName,
			"op", opName(op), "nodeID", node, "panic", fmt.Sprint(p.value), "stack", string(p.stack))
		w, st = 0, fuse.OK
		if len(in[0]) >= inHeaderSize && refuseNeedsReply(op) {
			w = errorReply(out[0], unique, syscall.EIO)
		}
	}()
	return s.ps.HandleRequest(in, out)
}

// errorReply writes to out a reply of errno to the request unique and
// returns its length.
func errorReply(out []byte, unique uint64, errno syscall.Errno) int {
	binary.LittleEndian.PutUint32(out[0:], outHeaderSize)
	binary.LittleEndian.PutUint32(out[4:], uint32(-int32(errno)))
	binary.LittleEndian.PutUint64(out[8:], unique)
	return outHeaderSize
}

// opName returns the name of opcode op.
func opName(op uint32) string {
	if int(op) < len(opNames) && opNames[op] != "" {
		return opNames[op]
	}
	return fmt.Sprintf("OPCODE_%d", op)
}

// wakeAll makes stopFd readable for good, which wakes every reader
// waiting and keeps any from waiting again. Readers then end.
func (s *session) wakeAll() {
	s.spawnMu.Lock()
	s.stopping.Store(true)
	s.spawnMu.Unlock()
	one := [8]byte{1}
	// An eventfd write fails only when its counter would overflow, which
	// takes 2^64-2 writes.
	unix.Write(s.stopFd, one[:])
}

// openBacking registers fd as a passthrough backing file of the
// connection (FUSE_DEV_IOC_BACKING_OPEN) and returns its id.
func (s *session) openBacking(fd int) (int32, syscall.Errno) {
	m := struct {
		fd      int32
		flags   uint32
		padding uint64
	}{fd: int32(fd)}
	s.backingOpens.Add(1)
	id, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(s.devFd), iocBackingOpen, uintptr(unsafe.Pointer(&m)))
	return int32(id), errno
}

// closeBacking unregisters the backing file id.
func (s *session) closeBacking(id int32) syscall.Errno {
	s.backingCloses.Add(1)
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(s.devFd), iocBackingClose, uintptr(unsafe.Pointer(&id)))
	return errno
}

// wait blocks until serving has ended.
func (s *session) wait() { <-s.done }
