package handoff

import (
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Limits of one message.
const (
	// MaxMeta is the most bytes of Bundle.Meta (or Msg.Data).
	MaxMeta = 64 << 10
	// MaxFiles is the most descriptors of one message.
	MaxFiles = 8
	// MaxID is the longest ID, in bytes.
	MaxID = 1024
	// maxOp is the longest op, in bytes.
	maxOp = 255

	version    = 1
	headerSize = 12
	maxMsgSize = headerSize + maxOp + MaxID + MaxMeta
)

// Ops of the peer protocol, for Send and Recv; a driver may add its own.
const (
	// OpBundle carries one bundle: ID, Meta as Data, Files.
	OpBundle = "bundle"
	// OpEnd ends a sequence of bundles.
	OpEnd = "end"
	// OpAck acknowledges.
	OpAck = "ack"
	// OpError refuses; Data is the reason, which Expect and RecvBundles
	// return as a *PeerError.
	OpError = "error"
)

// ErrBadMessage is returned (wrapped) for a message that breaks the wire
// format, received or about to be sent.
var ErrBadMessage = errors.New("handoff: bad message")

// A PeerError is a refusal the peer sent (an OpError message). The
// connection stays usable.
type PeerError struct {
	// Reason is the peer's message.
	Reason string
}

func (e *PeerError) Error() string { return "handoff: peer refused: " + e.Reason }

// A Bundle is one volume's session: its id, opaque metadata, and
// descriptors.
type Bundle struct {
	// ID names the bundle, e.g. the volume id; 1..MaxID bytes.
	ID string
	// Meta is opaque to handoff; up to MaxMeta bytes.
	Meta []byte
	// Files are the descriptors, e.g. /dev/fuse and a memfd; up to
	// MaxFiles. Sending leaves them open and in the mode they were.
	Files []*os.File
}

// Close closes the bundle's files.
func (b Bundle) Close() {
	closeFiles(b.Files)
}

// A Msg is one message of the peer protocol.
type Msg struct {
	// Op says what the message is: 1..255 bytes.
	Op string
	// ID is up to MaxID bytes.
	ID string
	// Data is up to MaxMeta bytes.
	Data []byte
	// Files are up to MaxFiles descriptors. A received file whose
	// descriptor is non-blocking is pollable (os.NewFile), so its
	// deadlines work.
	Files []*os.File
}

// Close closes the message's files.
func (m Msg) Close() {
	closeFiles(m.Files)
}

func closeFiles(files []*os.File) {
	for _, f := range files {
		if f != nil {
			f.Close()
		}
	}
}

// Conn is one end of a handoff connection. One goroutine may send while
// another receives; two may not receive at once.
type Conn struct {
	uc *net.UnixConn
	// rbuf and oob are the receive buffers, allocated by the first
	// receive. Owned by the receiving goroutine.
	rbuf, oob []byte
}

// DialConn connects to the listener at path.
func DialConn(path string) (*Conn, error) {
	uc, err := net.DialUnix("unixpacket", nil, &net.UnixAddr{Name: path, Net: "unixpacket"})
	if err != nil {
		return nil, fmt.Errorf("handoff: %w", err)
	}
	return &Conn{uc: uc}, nil
}

// Close closes the connection; a receive blocked in another goroutine
// returns an error.
func (c *Conn) Close() error { return c.uc.Close() }

// SetDeadline sets the deadline of every send and receive; the zero time
// clears it.
func (c *Conn) SetDeadline(t time.Time) error { return c.uc.SetDeadline(t) }

// Send sends one message. Its files stay open and keep their mode: each
// descriptor is taken with SyscallConn, never with Fd, which would make a
// non-blocking file blocking.
func (c *Conn) Send(m Msg) error {
	for _, f := range m.Files {
		if f == nil {
			return fmt.Errorf("%w: nil file", ErrBadMessage)
		}
	}
	return withFds(m.Files, nil, func(fds []int) error {
		return c.sendRaw(m.Op, m.ID, m.Data, fds)
	})
}

// withFds calls fn with the descriptors of files, each held open (by its
// SyscallConn's Control) until fn returns.
func withFds(files []*os.File, fds []int, fn func([]int) error) error {
	if len(files) == 0 {
		return fn(fds)
	}
	rc, err := files[0].SyscallConn()
	if err != nil {
		return fmt.Errorf("handoff: %s: %w", files[0].Name(), err)
	}
	var ferr error
	if err := rc.Control(func(fd uintptr) {
		ferr = withFds(files[1:], append(fds, int(fd)), fn)
	}); err != nil {
		return fmt.Errorf("handoff: %s: %w", files[0].Name(), err)
	}
	return ferr
}

// Recv receives one message. At the end of the connection it returns
// io.EOF. A bad message is an error wrapping ErrBadMessage; its
// descriptors have been closed, and the next Recv gets the next message.
func (c *Conn) Recv() (Msg, error) {
	r, err := c.recvRaw()
	if err != nil {
		return Msg{}, err
	}
	m := Msg{Op: r.op, ID: r.id, Data: r.data}
	for i, fd := range r.fds {
		m.Files = append(m.Files, os.NewFile(uintptr(fd), fmt.Sprintf("handoff:%s#%d", r.id, i)))
	}
	return m, nil
}

// Expect receives one message and checks that its op is op. An OpError
// message becomes a *PeerError; another op is an error, and the message's
// files are closed.
func (c *Conn) Expect(op string) (Msg, error) {
	m, err := c.Recv()
	if err != nil {
		return Msg{}, err
	}
	if m.Op == op {
		return m, nil
	}
	m.Close()
	if m.Op == OpError {
		return Msg{}, &PeerError{Reason: string(m.Data)}
	}
	return Msg{}, fmt.Errorf("handoff: got %q, want %q", m.Op, op)
}

// SendBundles sends bs as OpBundle messages, then OpEnd.
func (c *Conn) SendBundles(bs []Bundle) error {
	for _, b := range bs {
		if b.ID == "" {
			return fmt.Errorf("%w: bundle without an id", ErrBadMessage)
		}
		if err := c.Send(Msg{Op: OpBundle, ID: b.ID, Data: b.Meta, Files: b.Files}); err != nil {
			return err
		}
	}
	return c.Send(Msg{Op: OpEnd})
}

// RecvBundles receives OpBundle messages up to OpEnd. On any error, the
// files of the bundles received so far are closed.
func (c *Conn) RecvBundles() ([]Bundle, error) {
	var bs []Bundle
	for {
		m, err := c.Recv()
		if err == nil && m.Op == OpEnd {
			m.Close()
			return bs, nil
		}
		if err == nil && m.Op != OpBundle {
			m.Close()
			if m.Op == OpError {
				err = &PeerError{Reason: string(m.Data)}
			} else {
				err = fmt.Errorf("handoff: got %q among bundles", m.Op)
			}
		}
		if err != nil {
			for _, b := range bs {
				b.Close()
			}
			if errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, err
		}
		bs = append(bs, Bundle{ID: m.ID, Meta: m.Data, Files: m.Files})
	}
}

// rawMsg is a decoded message whose descriptors are plain numbers, owned by
// whoever holds the rawMsg. The holder keeps them so: an *os.File of a
// non-blocking descriptor would join the runtime's poller, and every FUSE
// request arriving on a held /dev/fuse would wake the holder.
type rawMsg struct {
	op, id string
	data   []byte
	fds    []int
}

func (r rawMsg) close() { closeFds(r.fds) }

func closeFds(fds []int) {
	for _, fd := range fds {
		unix.Close(fd)
	}
}

// checkMsg checks the limits of a message.
func checkMsg(op, id string, dataLen, nfds int) error {
	switch {
	case op == "" || len(op) > maxOp:
		return fmt.Errorf("%w: op of %d bytes, want 1 to %d", ErrBadMessage, len(op), maxOp)
	case len(id) > MaxID:
		return fmt.Errorf("%w: id of %d bytes, want at most %d", ErrBadMessage, len(id), MaxID)
	case dataLen > MaxMeta:
		return fmt.Errorf("%w: %d bytes of data, want at most %d", ErrBadMessage, dataLen, MaxMeta)
	case nfds > MaxFiles:
		return fmt.Errorf("%w: %d descriptors, want at most %d", ErrBadMessage, nfds, MaxFiles)
	}
	return nil
}

// sendRaw sends one message with the descriptors fds.
func (c *Conn) sendRaw(op, id string, data []byte, fds []int) error {
	if err := checkMsg(op, id, len(data), len(fds)); err != nil {
		return err
	}
	b := make([]byte, headerSize, headerSize+len(op)+len(id)+len(data))
	b[0] = version
	b[1] = byte(len(op))
	binary.LittleEndian.PutUint16(b[2:], uint16(len(id)))
	binary.LittleEndian.PutUint32(b[4:], uint32(len(data)))
	binary.LittleEndian.PutUint32(b[8:], uint32(len(fds)))
	b = append(append(append(b, op...), id...), data...)
	var oob []byte
	if len(fds) > 0 {
		oob = unix.UnixRights(fds...)
	}
	if _, _, err := c.uc.WriteMsgUnix(b, oob, nil); err != nil {
		return fmt.Errorf("handoff: sending %s: %w", op, err)
	}
	return nil
}

// recvRaw receives one message.
func (c *Conn) recvRaw() (rawMsg, error) {
	if c.rbuf == nil {
		// One byte more than the largest message, so that a larger one
		// shows as MSG_TRUNC; room for MaxFiles descriptors, so that
		// more show as MSG_CTRUNC.
		c.rbuf = make([]byte, maxMsgSize+1)
		c.oob = make([]byte, unix.CmsgSpace(MaxFiles*4))
	}
	rc, err := c.uc.SyscallConn()
	if err != nil {
		return rawMsg{}, fmt.Errorf("handoff: %w", err)
	}
	var n, oobn, flags int
	var rerr error
	err = rc.Read(func(fd uintptr) bool {
		for {
			n, oobn, flags, _, rerr = unix.Recvmsg(int(fd), c.rbuf, c.oob, unix.MSG_CMSG_CLOEXEC)
			if rerr != unix.EINTR {
				return rerr != unix.EAGAIN
			}
		}
	})
	if err == nil {
		err = rerr
	}
	if err != nil {
		// A failed recvmsg transfers no descriptors.
		return rawMsg{}, fmt.Errorf("handoff: receiving: %w", err)
	}
	fds := parseRights(c.oob[:oobn])
	if n == 0 && len(fds) == 0 && flags&unix.MSG_CTRUNC == 0 {
		return rawMsg{}, io.EOF
	}
	r, err := decode(c.rbuf[:n], flags, len(fds))
	if err != nil {
		closeFds(fds)
		return rawMsg{}, err
	}
	r.fds = fds
	return r, nil
}

// decode parses a received message of flags (recvmsg's) that came with
// nfds descriptors. The data is copied out of b.
func decode(b []byte, flags, nfds int) (rawMsg, error) {
	switch {
	case flags&unix.MSG_TRUNC != 0:
		return rawMsg{}, fmt.Errorf("%w: longer than %d bytes", ErrBadMessage, maxMsgSize)
	case flags&unix.MSG_CTRUNC != 0:
		return rawMsg{}, fmt.Errorf("%w: more than %d descriptors", ErrBadMessage, MaxFiles)
	case len(b) < headerSize:
		return rawMsg{}, fmt.Errorf("%w: %d bytes, shorter than a header", ErrBadMessage, len(b))
	case b[0] != version:
		return rawMsg{}, fmt.Errorf("%w: version %d, want %d", ErrBadMessage, b[0], version)
	}
	opLen := int(b[1])
	idLen := int(binary.LittleEndian.Uint16(b[2:]))
	dataLen := int64(binary.LittleEndian.Uint32(b[4:]))
	wantFds := int64(binary.LittleEndian.Uint32(b[8:]))
	if int64(len(b)) != headerSize+int64(opLen)+int64(idLen)+dataLen {
		return rawMsg{}, fmt.Errorf("%w: %d bytes, the header says %d", ErrBadMessage, len(b), headerSize+int64(opLen)+int64(idLen)+dataLen)
	}
	if wantFds != int64(nfds) {
		return rawMsg{}, fmt.Errorf("%w: %d descriptors, the header says %d", ErrBadMessage, nfds, wantFds)
	}
	b = b[headerSize:]
	r := rawMsg{op: string(b[:opLen]), id: string(b[opLen : opLen+idLen])}
	if dataLen > 0 {
		r.data = append([]byte(nil), b[opLen+idLen:]...)
	}
	if err := checkMsg(r.op, r.id, len(r.data), nfds); err != nil {
		return rawMsg{}, err
	}
	return r, nil
}

// parseRights returns every descriptor of the SCM_RIGHTS control messages
// in oob. Unlike unix.ParseSocketControlMessage it gives up on nothing: a
// descriptor it did not find would leak.
func parseRights(oob []byte) []int {
	var fds []int
	for len(oob) >= unix.CmsgLen(0) {
		h := (*unix.Cmsghdr)(unsafe.Pointer(&oob[0]))
		l := int(h.Len)
		if l < unix.CmsgLen(0) {
			break
		}
		if h.Level == unix.SOL_SOCKET && h.Type == unix.SCM_RIGHTS {
			for b := oob[unix.CmsgLen(0):min(l, len(oob))]; len(b) >= 4; b = b[4:] {
				fds = append(fds, int(int32(binary.NativeEndian.Uint32(b))))
			}
		}
		next := unix.CmsgSpace(l - unix.CmsgLen(0))
		if next >= len(oob) {
			break
		}
		oob = oob[next:]
	}
	return fds
}
