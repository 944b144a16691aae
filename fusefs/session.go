package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
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
// reply. Measured against fuse.Server, the loop costs nothing on the
// metadata path (docs/restart.md, "proto").

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
)

// session serves one FUSE connection.
type session struct {
	// dev is the connection's /dev/fuse descriptor, non-blocking and so
	// read through the runtime's poller, which lets stop wake its readers
	// with a deadline. Immutable; closed by close.
	dev *os.File
	// devFd is dev's descriptor number, for ioctls. Immutable.
	devFd int
	ps    *fuse.ProtocolServer
	raw   *rawFS
	// init is the INIT request the kernel sent followed by the reply it
	// got, verbatim (the request's header gives its length). Set before
	// serving; immutable after.
	init []byte
	// bufSize is the size of request and reply buffers: the largest
	// request (a WRITE of max_write) or reply (a READ of max_read) with
	// their headers, and room for xattr values. Immutable.
	bufSize int

	// stopping is set once stop has begun: readers finish the request
	// they hold and end.
	stopping atomic.Bool
	// idle counts readers waiting for a request; readers counts all.
	// Readers keep idle <= readers <= maxReaders (a moment's excess is
	// harmless).
	idle, readers atomic.Int32
	// endMu protects endErr.
	endMu sync.Mutex
	// endErr is why serving ended, if not stop: nil when the connection
	// ended (unmounted).
	endErr error
	// wg counts running readers.
	wg sync.WaitGroup
	// done is closed when the last reader has ended.
	done chan struct{}

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

// newSession makes a session that serves raw on dev, a /dev/fuse
// descriptor it now owns.
func newSession(devFd int, raw *rawFS, mo *fuse.MountOptions) (*session, error) {
	if err := unix.SetNonblock(devFd, true); err != nil {
		unix.Close(devFd)
		return nil, err
	}
	s := &session{
		dev:     os.NewFile(uintptr(devFd), "/dev/fuse"),
		devFd:   devFd,
		ps:      fuse.NewProtocolServer(raw, mo),
		raw:     raw,
		bufSize: mo.MaxWrite + 64<<10 + 4096,
		done:    make(chan struct{}),
	}
	raw.dev = s
	return s, nil
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
	out := make([]byte, s.bufSize)
	w, st := s.ps.HandleRequest([][]byte{buf[:n]}, [][]byte{out})
	if !st.Ok() || w == 0 {
		return fmt.Errorf("answering INIT: %v", st)
	}
	if _, err := s.dev.Write(out[:w]); err != nil {
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

// replayInit feeds the recorded INIT of a connection that another process
// began (see session.init) into this session's ProtocolServer, which needs
// it to parse requests, and drops the reply: the kernel had its answer
// long ago. What counts is what that answer negotiated: its capabilities,
// and its max_write, which sizes the request buffers. A server with other
// options would have answered otherwise; that is logged.
func (s *session) replayInit(init []byte) error {
	if len(init) < 8 || binary.LittleEndian.Uint32(init[4:]) != opInit {
		return errors.New("the recorded INIT request is not one")
	}
	n := int(binary.LittleEndian.Uint32(init))
	if n > len(init) {
		return errors.New("the recorded INIT request is cut short")
	}
	req, reply := init[:n], init[n:]
	out := make([]byte, s.bufSize)
	w, st := s.ps.HandleRequest([][]byte{req}, [][]byte{out})
	if !st.Ok() || w == 0 {
		return fmt.Errorf("replaying INIT: %v", st)
	}
	ours, err := parseInitReply(out[:w])
	if err != nil {
		return err
	}
	kernel := ours
	if len(reply) > 0 {
		if kernel, err = parseInitReply(reply); err != nil {
			return fmt.Errorf("the recorded INIT reply: %w", err)
		}
		s.bufSize = max(s.bufSize, int(kernel.MaxWrite)+64<<10+4096)
	} else {
		reply = out[:w]
	}
	if ours.Flags64() != kernel.Flags64() || ours.MaxWrite != kernel.MaxWrite {
		klog.InfoS("This server's options differ from those the connection was mounted with; serving by the mount's",
			"fsName", s.raw.opts.FsName, "flags", kernel.Flags64(), "ourFlags", ours.Flags64(),
			"maxWrite", kernel.MaxWrite, "ourMaxWrite", ours.MaxWrite)
	}
	s.init = append(append([]byte(nil), req...), reply...)
	s.raw.negotiated(kernel.Flags64())
	return nil
}

// parseInitReply parses an INIT reply (with its fuse_out_header).
func parseInitReply(out []byte) (fuse.InitOut, error) {
	const hdr = 16 // fuse_out_header
	var io fuse.InitOut
	if len(out) < hdr+int(unsafe.Sizeof(io)) {
		return io, fmt.Errorf("INIT reply of %d bytes", len(out))
	}
	if errno := int32(binary.LittleEndian.Uint32(out[4:])); errno != 0 {
		return io, fmt.Errorf("INIT refused: %v", syscall.Errno(-errno))
	}
	copy(unsafe.Slice((*byte)(unsafe.Pointer(&io)), unsafe.Sizeof(io)), out[hdr:])
	return io, nil
}

// read reads one request into buf, retrying what only means "try again".
func (s *session) read(buf []byte) (int, error) {
	for {
		n, err := s.dev.Read(buf)
		// EINTR: a signal; ENOENT: the request was interrupted and
		// withdrawn while being read.
		if errors.Is(err, syscall.EINTR) || errors.Is(err, syscall.ENOENT) {
			continue
		}
		return n, err
	}
}

// serve starts the readers; done is closed when they have all ended.
func (s *session) serve() {
	s.readers.Store(1)
	s.wg.Add(1)
	go s.reader()
	go func() {
		s.wg.Wait()
		s.endMu.Lock()
		err := s.endErr
		s.endMu.Unlock()
		if err != nil {
			// Requests now wait for a successor (or the holder's EIO).
			klog.ErrorS(err, "Serving a FUSE connection failed; no longer reading it", "fsName", s.raw.opts.FsName)
		}
		close(s.done)
	}()
}

// reader reads and serves requests until the connection ends or stop. A
// reader that takes a request while no other waits starts another (up to
// maxReaders), and one that finishes while two others wait ends, as
// go-fuse's own loop does. Reads are serialized by the runtime (one read
// of a descriptor at a time), serving is not.
func (s *session) reader() {
	defer s.wg.Done()
	defer s.readers.Add(-1)
	in := s.getBuf()
	defer bufPool.Put(in)
	for !s.stopping.Load() {
		s.idle.Add(1)
		n, err := s.read(*in)
		idle := s.idle.Add(-1)
		if err != nil {
			if !errors.Is(err, os.ErrDeadlineExceeded) && !errors.Is(err, syscall.ENODEV) {
				s.endMu.Lock()
				if s.endErr == nil {
					s.endErr = err
				}
				s.endMu.Unlock()
			}
			return
		}
		if idle == 0 && !s.stopping.Load() {
			if s.readers.Add(1) <= maxReaders {
				s.wg.Add(1)
				go s.reader()
			} else {
				s.readers.Add(-1)
			}
		}
		s.handle((*in)[:n])
		if s.idle.Load() >= 2 {
			return
		}
	}
}

// handle serves one request and writes its reply, if it takes one.
func (s *session) handle(in []byte) {
	var noReply bool
	if h := s.testHook.Load(); h != nil {
		var skip bool
		if skip, noReply = (*h)(in); skip {
			return
		}
	}
	outp := s.getBuf()
	defer bufPool.Put(outp)
	out := *outp
	w, st := s.ps.HandleRequest([][]byte{in}, [][]byte{out})
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
	if _, err := s.dev.Write(out[:w]); err != nil && !errors.Is(err, syscall.ENOENT) && !errors.Is(err, syscall.ENODEV) {
		// ENOENT: the caller was interrupted and gave up; ENODEV: the
		// connection ended. Anything else is a malformed reply: a bug.
		klog.ErrorS(err, "Writing a FUSE reply", "fsName", s.raw.opts.FsName)
	}
}

// stop stops reading requests and returns once every request read has
// been answered. Requests arriving meanwhile wait in the kernel for the
// connection's next server. It says whether the connection is still alive.
func (s *session) stop() bool {
	s.stopping.Store(true)
	s.dev.SetReadDeadline(time.Now())
	<-s.done
	s.dev.SetReadDeadline(time.Time{})
	s.endMu.Lock()
	defer s.endMu.Unlock()
	return s.endErr == nil && !s.ended()
}

// ended says whether the kernel has ended the connection: a read then
// fails with ENODEV at once.
func (s *session) ended() bool {
	var pfd = []unix.PollFd{{Fd: int32(s.devFd), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 0)
	return err == nil && n == 1 && pfd[0].Revents&(unix.POLLERR|unix.POLLHUP) != 0
}

// resend asks the kernel to queue again every request it sent on this
// connection and has had no answer to (FUSE_NOTIFY_RESEND, Linux >= 6.9):
// those a dead server read and never answered. It must come before the
// first read, while every unanswered request is the dead server's.
func (s *session) resend() error {
	var msg [16]byte
	binary.LittleEndian.PutUint32(msg[0:], 16)
	binary.LittleEndian.PutUint32(msg[4:], notifyResend)
	_, err := s.dev.Write(msg[:])
	return err
}

// openBacking registers fd as a passthrough backing file of the
// connection (FUSE_DEV_IOC_BACKING_OPEN) and returns its id.
func (s *session) openBacking(fd int) (int32, syscall.Errno) {
	m := struct {
		fd      int32
		flags   uint32
		padding uint64
	}{fd: int32(fd)}
	id, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(s.devFd), iocBackingOpen, uintptr(unsafe.Pointer(&m)))
	return int32(id), errno
}

// closeBacking unregisters the backing file id.
func (s *session) closeBacking(id int32) syscall.Errno {
	_, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(s.devFd), iocBackingClose, uintptr(unsafe.Pointer(&id)))
	return errno
}

// wait blocks until serving has ended.
func (s *session) wait() { <-s.done }
