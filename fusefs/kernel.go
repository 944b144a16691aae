package fusefs

import "encoding/binary"

// FUSE protocol constants shared by the /dev/fuse loop (session.go), the
// io_uring transport (uring_fuse.go) and Refuse (include/uapi/linux/fuse.h;
// opInit is in session.go).
const (
	// inHeaderSize is sizeof(struct fuse_in_header): len u32, opcode u32,
	// unique u64, nodeid u64, uid, gid, pid u32, total_extlen u16,
	// padding u16.
	inHeaderSize = 40
	// outHeaderSize is sizeof(struct fuse_out_header): len u32, error
	// s32, unique u64.
	outHeaderSize = 16

	// Opcodes of the requests that take no reply, besides INIT's.
	opForget      = 2
	opInterrupt   = 36
	opNotifyReply = 41
	opBatchForget = 42
)

// resendMinor is the FUSE protocol minor version of FUSE_NOTIFY_RESEND
// (7.40, Linux 6.9).
const resendMinor = 40

// KernelResend says whether the kernel that mounted the connection can
// resend the requests of a server that died (FUSE_NOTIFY_RESEND), from
// the protocol version its INIT request offered. Without it, a request the
// dead server had read is never answered: its caller waits until the
// connection ends.
func (s *Server) KernelResend() bool { return initMinor(s.sess.init) >= resendMinor }

// initMinor returns the protocol minor version of a recorded INIT request
// (fuse_in_header, then fuse_init_in's major and minor), or 0.
func initMinor(init []byte) uint32 {
	const minorOff = inHeaderSize + 4
	if len(init) < minorOff+4 || binary.LittleEndian.Uint32(init[4:]) != opInit {
		return 0
	}
	return binary.LittleEndian.Uint32(init[minorOff:])
}
