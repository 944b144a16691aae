package fusefs

import (
	"fmt"
	"os"
	"sync/atomic"
	"unsafe"

	"golang.org/x/sys/unix"
)

// A minimal io_uring: what the FUSE ring transport (uring_fuse.go) needs
// and nothing more. It is written here on raw system calls because no
// maintained Go binding offers IORING_OP_URING_CMD with 128-byte SQEs in
// a small, dependency-free form (none is in the set of modules this
// project draws from), and what FUSE needs is about a hundred lines: one
// ring per thread, SQE128, submit and wait in one io_uring_enter.
//
// A ring is used by one locked OS thread only (IORING_SETUP_SINGLE_ISSUER
// and DEFER_TASKRUN: the kernel runs the ring's completion work only when
// that thread waits in io_uring_enter), so nothing here is locked.

// io_uring ABI (include/uapi/linux/io_uring.h).
const (
	sysIOUringSetup = 425
	sysIOUringEnter = 426

	ioringSetupSQE128       = 1 << 10
	ioringSetupSingleIssuer = 1 << 12
	ioringSetupDeferTaskrun = 1 << 13
	ioringFeatSingleMmap    = 1 << 0
	ioringEnterGetEvents    = 1 << 0
	ioringOffSQRing         = 0
	ioringOffCQRing         = 0x8000000
	ioringOffSQEs           = 0x10000000
	ioringOpURingCmd        = 46
	ioringOpPollAdd         = 6
	sqe128Size              = 128
	cqeSize                 = 16
	uringParamsSize         = 120
	uringCmdOffset          = 48 // where a URING_CMD's payload begins in an SQE
	uringSetupFlags         = ioringSetupSQE128 | ioringSetupSingleIssuer | ioringSetupDeferTaskrun
)

// uringParams is struct io_uring_params.
type uringParams struct {
	sqEntries, cqEntries, flags, sqThreadCPU, sqThreadIdle, features, wqFd uint32
	resv                                                                   [3]uint32
	sqOff                                                                  struct {
		head, tail, ringMask, ringEntries, flags, dropped, array, resv1 uint32
		userAddr                                                        uint64
	}
	cqOff struct {
		head, tail, ringMask, ringEntries, overflow, cqes, flags, resv1 uint32
		userAddr                                                        uint64
	}
}

// uring is one io_uring instance. Every field is immutable after
// newURing; the ring's indices are shared with the kernel and accessed
// atomically.
type uring struct {
	fd int
	// sqRing and cqRing are the mapped rings (one mapping when the kernel
	// has IORING_FEAT_SINGLE_MMAP); sqes the SQE array.
	sqRing, cqRing, sqes []byte
	sqHead, sqTail       *uint32
	sqMask               uint32
	sqArray              []uint32
	cqHead, cqTail       *uint32
	cqMask               uint32
	cqes                 []byte
	// sqLocal is the tail of SQEs prepared and not yet published to the
	// kernel; only the owning thread touches it.
	sqLocal uint32
}

// newURing sets up a ring of entries SQEs with 128-byte SQEs. The error
// is the raw errno of io_uring_setup when that fails (ENOSYS: no
// io_uring; EPERM: io_uring_disabled or a seccomp filter).
func newURing(entries uint32) (*uring, error) {
	var p uringParams
	p.flags = uringSetupFlags
	fd, _, errno := unix.Syscall(sysIOUringSetup, uintptr(entries), uintptr(unsafe.Pointer(&p)), 0)
	if errno != 0 {
		return nil, os.NewSyscallError("io_uring_setup", errno)
	}
	r := &uring{fd: int(fd)}
	fail := func(err error) (*uring, error) {
		r.close()
		return nil, err
	}
	sqSize := int(p.sqOff.array) + int(p.sqEntries)*4
	cqSize := int(p.cqOff.cqes) + int(p.cqEntries)*cqeSize
	if p.features&ioringFeatSingleMmap != 0 {
		sqSize = max(sqSize, cqSize)
	}
	var err error
	if r.sqRing, err = unix.Mmap(r.fd, ioringOffSQRing, sqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fail(fmt.Errorf("mapping the submission ring: %w", err))
	}
	r.cqRing = r.sqRing
	if p.features&ioringFeatSingleMmap == 0 {
		if r.cqRing, err = unix.Mmap(r.fd, ioringOffCQRing, cqSize, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
			return fail(fmt.Errorf("mapping the completion ring: %w", err))
		}
	}
	if r.sqes, err = unix.Mmap(r.fd, ioringOffSQEs, int(p.sqEntries)*sqe128Size, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED|unix.MAP_POPULATE); err != nil {
		return fail(fmt.Errorf("mapping the SQEs: %w", err))
	}
	r.sqHead = (*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.head]))
	r.sqTail = (*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.tail]))
	r.sqMask = *(*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.ringMask]))
	r.sqArray = unsafe.Slice((*uint32)(unsafe.Pointer(&r.sqRing[p.sqOff.array])), p.sqEntries)
	r.cqHead = (*uint32)(unsafe.Pointer(&r.cqRing[p.cqOff.head]))
	r.cqTail = (*uint32)(unsafe.Pointer(&r.cqRing[p.cqOff.tail]))
	r.cqMask = *(*uint32)(unsafe.Pointer(&r.cqRing[p.cqOff.ringMask]))
	r.cqes = r.cqRing[p.cqOff.cqes : int(p.cqOff.cqes)+int(p.cqEntries)*cqeSize]
	// SQE i always sits in slot i: the array is the identity.
	for i := range r.sqArray {
		r.sqArray[i] = uint32(i)
	}
	r.sqLocal = atomic.LoadUint32(r.sqTail)
	return r, nil
}

// close unmaps and closes the ring. The kernel cancels what is still
// submitted (for FUSE entries: fuse_uring_cancel).
func (r *uring) close() {
	if r.sqes != nil {
		unix.Munmap(r.sqes)
	}
	if r.cqRing != nil && &r.cqRing[0] != &r.sqRing[0] {
		unix.Munmap(r.cqRing)
	}
	if r.sqRing != nil {
		unix.Munmap(r.sqRing)
	}
	unix.Close(r.fd)
}

// uringCmd prepares an IORING_OP_URING_CMD SQE on fd with command op,
// address addr and length n, and returns its 80-byte command area.
func (r *uring) uringCmd(fd int, op uint32, addr uintptr, n uint32, userData uint64) []byte {
	sqe := r.prep(ioringOpURingCmd, fd, userData)
	*(*uint32)(unsafe.Pointer(&sqe[8])) = op
	*(*uint64)(unsafe.Pointer(&sqe[16])) = uint64(addr)
	*(*uint32)(unsafe.Pointer(&sqe[24])) = n
	return sqe[uringCmdOffset:]
}

// prep returns the next SQE, cleared, with its opcode, fd and user data.
// The caller must not prepare more SQEs than the ring has before enter.
func (r *uring) prep(op uint8, fd int, userData uint64) []byte {
	i := r.sqLocal & r.sqMask
	r.sqLocal++
	sqe := r.sqes[int(i)*sqe128Size : int(i+1)*sqe128Size]
	clear(sqe)
	sqe[0] = op
	*(*int32)(unsafe.Pointer(&sqe[4])) = int32(fd)
	*(*uint64)(unsafe.Pointer(&sqe[32])) = userData
	return sqe
}

// pollIn prepares a one-shot IORING_OP_POLL_ADD of fd for POLLIN.
func (r *uring) pollIn(fd int, userData uint64) {
	sqe := r.prep(ioringOpPollAdd, fd, userData)
	*(*uint32)(unsafe.Pointer(&sqe[28])) = unix.POLLIN
}

// enter publishes the prepared SQEs and, with wait, blocks until at least
// one completion is there. EINTR is returned as is.
func (r *uring) enter(wait bool) error {
	atomic.StoreUint32(r.sqTail, r.sqLocal)
	// SQEs an interrupted enter did not take stay published; count them.
	submit := r.sqLocal - atomic.LoadUint32(r.sqHead)
	var flags, least uintptr
	if wait {
		flags, least = ioringEnterGetEvents, 1
	}
	_, _, errno := unix.Syscall6(sysIOUringEnter, uintptr(r.fd), uintptr(submit), least, flags, 0, 0)
	if errno != 0 {
		return errno
	}
	return nil
}

// completions calls f with each completion's user data and result, and
// frees their slots.
func (r *uring) completions(f func(userData uint64, res int32)) {
	head := atomic.LoadUint32(r.cqHead)
	tail := atomic.LoadUint32(r.cqTail)
	for ; head != tail; head++ {
		c := r.cqes[int(head&r.cqMask)*cqeSize:]
		f(*(*uint64)(unsafe.Pointer(&c[0])), *(*int32)(unsafe.Pointer(&c[8])))
	}
	atomic.StoreUint32(r.cqHead, head)
}
