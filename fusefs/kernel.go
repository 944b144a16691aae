package fusefs

import "encoding/binary"

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
	const minorOff = 40 + 4
	if len(init) < minorOff+4 || binary.LittleEndian.Uint32(init[4:]) != opInit {
		return 0
	}
	return binary.LittleEndian.Uint32(init[minorOff:])
}
