package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Refusing requests: what the descriptor holder does with a connection
// whose server has been gone too long (docs/restart.md, "Crash"). Callers
// get EIO instead of waiting in the kernel for as long as the plugin is
// crash-looping; the mount stays, and a returning server serves it again.

// Refuse's buffer and polling.
const (
	// refuseBufSize is the read buffer. The kernel refuses a read into a
	// buffer smaller than a WRITE of max_write with its headers, and
	// Mount's largest max_write is 1 MiB.
	refuseBufSize = 1<<20 + 4<<10
	// refusePoll is how often Refuse looks at stop.
	refusePoll = 100 * time.Millisecond
)

// Refuse answers every request queued on the FUSE connection dev with EIO,
// until stop is closed or the connection ends (then it returns nil).
// Requests that take no reply (FORGET, BATCH_FORGET, INTERRUPT,
// NOTIFY_REPLY) get none. An INIT is left unanswered, since an error reply
// to INIT would break the connection for good; a successor gets it back
// with FUSE_NOTIFY_RESEND.
//
// Refuse reads through a duplicate of dev's descriptor made non-blocking,
// and polls it, so that it notices stop within refusePoll. O_NONBLOCK
// belongs to the open file, which dev shares with every other copy of the
// connection's descriptor: Refuse restores the file's flags before it
// returns. Once stop is closed it reads no more requests, so those that
// arrive stay queued for the next server. It logs one line when it
// returns, if it refused anything.
func Refuse(dev *os.File, stop <-chan struct{}) error {
	rc, err := dev.SyscallConn()
	if err != nil {
		return fmt.Errorf("fusefs: refuse: %w", err)
	}
	fd := -1
	cerr := rc.Control(func(s uintptr) {
		fd, err = unix.FcntlInt(s, unix.F_DUPFD_CLOEXEC, 0)
	})
	if err == nil {
		err = cerr
	}
	if err != nil {
		return fmt.Errorf("fusefs: refuse: duplicating %s: %w", dev.Name(), err)
	}
	defer unix.Close(fd)
	flags, err := unix.FcntlInt(uintptr(fd), unix.F_GETFL, 0)
	if err != nil {
		return fmt.Errorf("fusefs: refuse: %w", err)
	}
	if flags&unix.O_NONBLOCK == 0 {
		if _, err := unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags|unix.O_NONBLOCK); err != nil {
			return fmt.Errorf("fusefs: refuse: %w", err)
		}
		defer unix.FcntlInt(uintptr(fd), unix.F_SETFL, flags)
	}

	var refused, unanswered int
	start := time.Now()
	defer func() {
		if refused+unanswered > 0 {
			klog.InfoS("Answered FUSE requests with EIO while no server was there",
				"dev", dev.Name(), "refused", refused, "unanswered", unanswered, "duration", time.Since(start).Round(time.Millisecond))
		}
	}()
	buf := make([]byte, refuseBufSize)
	var out [outHeaderSize]byte
	pfd := []unix.PollFd{{Fd: int32(fd), Events: unix.POLLIN}}
	for {
		select {
		case <-stop:
			return nil
		default:
		}
		ready, err := unix.Poll(pfd, int(refusePoll/time.Millisecond))
		if err != nil && err != unix.EINTR {
			return fmt.Errorf("fusefs: refuse: poll: %w", err)
		}
		if ready == 0 || err != nil {
			continue
		}
		select {
		case <-stop:
			return nil
		default:
		}
		n, err := unix.Read(fd, buf)
		switch {
		case err == unix.ENODEV:
			return nil // unmounted or aborted
		case err == unix.EAGAIN || err == unix.EINTR || err == unix.ENOENT:
			continue // nothing queued after all, or interrupted meanwhile
		case err != nil:
			return fmt.Errorf("fusefs: refuse: reading a request: %w", err)
		case n < inHeaderSize:
			continue // not a request; nothing to answer
		}
		op := binary.LittleEndian.Uint32(buf[4:])
		if !refuseNeedsReply(op) {
			unanswered++
			continue
		}
		errorReply(out[:], binary.LittleEndian.Uint64(buf[8:]), unix.EIO)
		if _, err := unix.Write(fd, out[:]); err != nil {
			switch {
			case errors.Is(err, unix.ENODEV):
				return nil
			case errors.Is(err, unix.ENOENT):
				// The request was interrupted and is gone.
			default:
				return fmt.Errorf("fusefs: refuse: replying: %w", err)
			}
		}
		refused++
	}
}

// refuseNeedsReply says whether Refuse answers a request of opcode op.
func refuseNeedsReply(op uint32) bool {
	switch op {
	case opForget, opBatchForget, opInterrupt, opNotifyReply, opInit:
		return false
	}
	return true
}
