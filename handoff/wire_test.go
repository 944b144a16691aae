package handoff

import (
	"bytes"
	"encoding/binary"
	"errors"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// socketpair returns the two ends of a SOCK_SEQPACKET socketpair.
func socketpair(t *testing.T) [2]int {
	t.Helper()
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	return [2]int{fds[0], fds[1]}
}

// newConn makes a Conn of the socket fd, which it takes over.
func newConn(t *testing.T, fd int) *Conn {
	t.Helper()
	f := os.NewFile(uintptr(fd), "pair")
	nc, err := net.FileConn(f)
	f.Close()
	if err != nil {
		t.Fatal(err)
	}
	c := &Conn{uc: nc.(*net.UnixConn)}
	t.Cleanup(func() { c.Close() })
	return c
}

// connPair returns two connected Conns.
func connPair(t *testing.T) (*Conn, *Conn) {
	fds := socketpair(t)
	return newConn(t, fds[0]), newConn(t, fds[1])
}

// rawPair returns a Conn and its peer as a plain descriptor, for messages
// made by hand.
func rawPair(t *testing.T) (*Conn, int) {
	fds := socketpair(t)
	t.Cleanup(func() { unix.Close(fds[1]) })
	return newConn(t, fds[0]), fds[1]
}

// openFds returns the process's open descriptors.
func openFds(t *testing.T) []string {
	t.Helper()
	ents, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for _, e := range ents {
		names = append(names, e.Name())
	}
	return names
}

// testPipe returns a pipe whose ends Cleanup closes.
func testPipe(t *testing.T) (r, w *os.File) {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { r.Close(); w.Close() })
	return r, w
}

// checkThrough writes through w and reads it back from r.
func checkThrough(t *testing.T, w, r *os.File, s string) {
	t.Helper()
	if _, err := w.Write([]byte(s)); err != nil {
		t.Fatalf("write through %s: %v", w.Name(), err)
	}
	buf := make([]byte, len(s))
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := io.ReadFull(r, buf); err != nil || string(buf) != s {
		t.Fatalf("read %q, %v; want %q", buf, err, s)
	}
}

func isCloexec(t *testing.T, f *os.File) bool {
	t.Helper()
	var flags int
	rc, _ := f.SyscallConn()
	rc.Control(func(fd uintptr) { flags, _ = unix.FcntlInt(fd, unix.F_GETFD, 0) })
	return flags&unix.FD_CLOEXEC != 0
}

func TestSendRecv(t *testing.T) {
	a, b := connPair(t)

	r, w := testPipe(t)
	mfd, err := unix.MemfdCreate("handoff-test", unix.MFD_CLOEXEC)
	if err != nil {
		t.Fatal(err)
	}
	mem := os.NewFile(uintptr(mfd), "memfd")
	defer mem.Close()
	mem.WriteString("in the memfd")
	meta := bytes.Repeat([]byte{0xa5}, MaxMeta)
	id := strings.Repeat("v", MaxID)

	if err := a.Send(Msg{Op: "some-op", ID: id, Data: meta, Files: []*os.File{w, mem}}); err != nil {
		t.Fatal(err)
	}
	// Sending leaves the files as they were: w is still pollable (Fd
	// would have made it blocking) and open.
	if err := w.SetWriteDeadline(time.Time{}); err != nil {
		t.Errorf("the sent pipe is no longer pollable: %v", err)
	}
	if err := b.Send(Msg{Op: OpAck}); err != nil {
		t.Fatal(err)
	}

	m, err := b.Recv()
	if err != nil {
		t.Fatal(err)
	}
	defer m.Close()
	if m.Op != "some-op" || m.ID != id || !bytes.Equal(m.Data, meta) || len(m.Files) != 2 {
		t.Fatalf("got op %q, id of %d bytes, %d bytes of data, %d files", m.Op, len(m.ID), len(m.Data), len(m.Files))
	}
	for _, f := range m.Files {
		if !isCloexec(t, f) {
			t.Errorf("received %s is not close-on-exec", f.Name())
		}
	}
	checkThrough(t, m.Files[0], r, "through the received pipe")
	got := make([]byte, 64)
	n, _ := m.Files[1].ReadAt(got, 0)
	if string(got[:n]) != "in the memfd" {
		t.Errorf("received memfd holds %q", got[:n])
	}

	// A bare control message, the other way.
	m2, err := a.Expect(OpAck)
	if err != nil || m2.ID != "" || m2.Data != nil || m2.Files != nil {
		t.Errorf("Expect(ack): %+v, %v", m2, err)
	}

	// EOF when the peer closes.
	b.Close()
	if _, err := a.Recv(); !errors.Is(err, io.EOF) {
		t.Errorf("Recv after the peer closed: %v, want EOF", err)
	}
}

func TestSendRefusesBadMessages(t *testing.T) {
	a, _ := connPair(t)
	_, w := testPipe(t)
	files := make([]*os.File, MaxFiles+1)
	for i := range files {
		files[i] = w
	}
	closed, _ := testPipe(t)
	closed.Close()
	for name, m := range map[string]Msg{
		"no op":          {ID: "x"},
		"long op":        {Op: strings.Repeat("o", 256)},
		"long id":        {Op: "x", ID: strings.Repeat("i", MaxID+1)},
		"too much data":  {Op: "x", Data: make([]byte, MaxMeta+1)},
		"too many files": {Op: "x", Files: files},
		"nil file":       {Op: "x", Files: []*os.File{nil}},
	} {
		if err := a.Send(m); !errors.Is(err, ErrBadMessage) {
			t.Errorf("%s: %v, want ErrBadMessage", name, err)
		}
	}
	if err := a.Send(Msg{Op: "x", Files: []*os.File{closed}}); err == nil {
		t.Error("sending a closed file: no error")
	}
}

// TestRecvBadMessages sends malformed messages by hand: each is refused
// with ErrBadMessage, every descriptor that came with it is closed, and the
// next message is received fine.
func TestRecvBadMessages(t *testing.T) {
	c, peer := rawPair(t)
	_, w := testPipe(t)
	header := func(op, id string, dataLen, nfds int) []byte {
		b := []byte{version, byte(len(op)), 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
		binary.LittleEndian.PutUint16(b[2:], uint16(len(id)))
		binary.LittleEndian.PutUint32(b[4:], uint32(dataLen))
		binary.LittleEndian.PutUint32(b[8:], uint32(nfds))
		return append(append(b, op...), id...)
	}
	fdsOf := func(n int) []int {
		fds := make([]int, n)
		for i := range fds {
			fds[i] = int(w.Fd())
		}
		return fds
	}
	good := header("ok", "id", 0, 1)
	for _, tc := range []struct {
		name string
		msg  []byte
		nfds int
	}{
		{"more descriptors than the header says", header("put", "id", 0, 1), 2},
		{"fewer descriptors than the header says", header("put", "id", 0, 3), 2},
		{"more descriptors than MaxFiles (MSG_CTRUNC)", header("put", "id", 0, MaxFiles+1), MaxFiles + 1},
		{"many more descriptors than MaxFiles", header("put", "id", 0, 4*MaxFiles), 4 * MaxFiles},
		{"longer than a message can be (MSG_TRUNC)", append(header("put", "id", maxMsgSize, 2), make([]byte, maxMsgSize)...), 2},
		{"shorter than a header", []byte{version, 1, 0}, 1},
		{"data shorter than the header says", append(header("put", "id", 10, 1), "abc"...), 1},
		{"data longer than the header says", append(header("put", "id", 1, 1), "abc"...), 1},
		{"another version", append([]byte{version + 1}, header("put", "id", 0, 1)[1:]...), 1},
		{"no op", header("", "id", 0, 1), 1},
		{"data over MaxMeta", append(header("put", "id", MaxMeta+1, 1), make([]byte, MaxMeta+1)...), 1},
	} {
		before := openFds(t)
		if err := unix.Sendmsg(peer, tc.msg, unix.UnixRights(fdsOf(tc.nfds)...), nil, 0); err != nil {
			t.Fatalf("%s: sendmsg: %v", tc.name, err)
		}
		if _, err := c.Recv(); !errors.Is(err, ErrBadMessage) {
			t.Errorf("%s: %v, want ErrBadMessage", tc.name, err)
		}
		if after := openFds(t); len(after) != len(before) {
			t.Errorf("%s: %d descriptors open before, %d after: %v, %v", tc.name, len(before), len(after), before, after)
		}
		// The connection goes on.
		if err := unix.Sendmsg(peer, good, unix.UnixRights(int(w.Fd())), nil, 0); err != nil {
			t.Fatal(err)
		}
		m, err := c.Recv()
		if err != nil || m.Op != "ok" || len(m.Files) != 1 {
			t.Fatalf("%s: the next message: %+v, %v", tc.name, m, err)
		}
		m.Close()
	}
}

// TestRecvBundles: bundles then end; a refusal, or an end of connection
// midway, closes what was received.
func TestRecvBundles(t *testing.T) {
	a, b := connPair(t)
	r, w := testPipe(t)
	if err := a.SendBundles([]Bundle{{ID: "v1", Meta: []byte("m1"), Files: []*os.File{w}}, {ID: "v2"}}); err != nil {
		t.Fatal(err)
	}
	bs, err := b.RecvBundles()
	if err != nil || len(bs) != 2 || bs[0].ID != "v1" || string(bs[0].Meta) != "m1" || len(bs[0].Files) != 1 || bs[1].ID != "v2" || bs[1].Files != nil {
		t.Fatalf("RecvBundles: %+v, %v", bs, err)
	}
	checkThrough(t, bs[0].Files[0], r, "v1")
	bs[0].Close()
	if err := a.SendBundles([]Bundle{{Files: []*os.File{w}}}); !errors.Is(err, ErrBadMessage) {
		t.Errorf("a bundle without an id: %v", err)
	}

	before := openFds(t)
	a.Send(Msg{Op: OpBundle, ID: "v1", Files: []*os.File{w}})
	a.Send(Msg{Op: OpError, Data: []byte("not today")})
	var pe *PeerError
	if _, err := b.RecvBundles(); !errors.As(err, &pe) || pe.Reason != "not today" {
		t.Errorf("refusal among bundles: %v", err)
	}
	a.Send(Msg{Op: OpBundle, ID: "v1", Files: []*os.File{w}})
	a.Close()
	if _, err := b.RecvBundles(); !errors.Is(err, io.ErrUnexpectedEOF) {
		t.Errorf("end of connection among bundles: %v", err)
	}
	b.Close()
	if after := openFds(t); len(after) != len(before)-2 {
		t.Errorf("%d descriptors open before, %d after (both sockets closed)", len(before), len(after))
	}
}

// TestListenReplaces: a second listener takes over the socket's path, and
// clients dialing all the while never fail to connect.
func TestListenReplaces(t *testing.T) {
	path := filepath.Join(t.TempDir(), "x.sock")
	var wg sync.WaitGroup
	listen := func() *Listener {
		l, err := Listen(path)
		if err != nil {
			t.Fatal(err)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for {
				c, err := l.Accept()
				if err != nil {
					return
				}
				c.Send(Msg{Op: OpAck})
				c.Close()
			}
		}()
		return l
	}
	l := listen()
	fi, err := os.Stat(path)
	if err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Fatalf("socket: %v, %v; want a socket of mode 0600", fi.Mode(), err)
	}

	stop := make(chan struct{})
	dialed := make(chan error, 1)
	go func() {
		n := 0
		for {
			select {
			case <-stop:
				if n == 0 {
					dialed <- errors.New("no dial")
				} else {
					dialed <- nil
				}
				return
			default:
			}
			c, err := DialConn(path)
			if err == nil {
				_, err = c.Expect(OpAck)
				c.Close()
			}
			if err != nil {
				dialed <- err
				return
			}
			n++
		}
	}()
	var old []*Listener
	for range 20 {
		old = append(old, l)
		l = listen()
		time.Sleep(5 * time.Millisecond)
	}
	// Stop dialing before the old listeners go: closing a listener drops
	// the connections still in its backlog, which is not what this test is
	// about.
	close(stop)
	if err := <-dialed; err != nil {
		t.Errorf("dialing while the socket was replaced: %v", err)
	}
	// With every old listener gone, a client reaches the newest.
	for _, o := range old {
		o.Close()
	}
	c, err := DialConn(path)
	if err == nil {
		_, err = c.Expect(OpAck)
		c.Close()
	}
	if err != nil {
		t.Errorf("dialing after the old listeners closed: %v", err)
	}
	l.Close()
	wg.Wait()
	if ents, _ := os.ReadDir(filepath.Dir(path)); len(ents) != 1 {
		t.Errorf("left in the directory: %v; want the socket alone", ents)
	}
}

// TestListenUnixStamps: each socket ListenUnix makes has a stamp of its own,
// even one bound within the same clock tick on an inode number just freed;
// RemoveSocket removes only the socket it is given the stamp of; anything
// but a socket at the path is left alone.
func TestListenUnixStamps(t *testing.T) {
	dir := t.TempDir()
	path := filepath.Join(dir, "csi.sock")
	seen := map[Stamp]bool{}
	var prev Stamp
	for range 20 {
		l, s, err := ListenUnix("unix", path)
		if err != nil {
			t.Fatal(err)
		}
		if seen[s] || s != StampAt(path) {
			t.Fatalf("stamp %v reused or not the path's (%v)", s, StampAt(path))
		}
		seen[s] = true
		l.Close()
		RemoveSocket(path, prev) // an older socket's stamp: not this one
		if StampAt(path) != s {
			t.Fatal("RemoveSocket removed a socket it was not given the stamp of")
		}
		prev = s
	}
	RemoveSocket(path, prev)
	if _, err := os.Lstat(path); !os.IsNotExist(err) {
		t.Errorf("RemoveSocket left its own socket: %v", err)
	}
	if names, _ := os.ReadDir(dir); len(names) != 0 {
		t.Errorf("left behind: %v", names)
	}
	if err := os.WriteFile(path, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	if _, _, err := ListenUnix("unix", path); err == nil || !strings.Contains(err.Error(), "not a socket") {
		t.Errorf("ListenUnix over a regular file: %v", err)
	}
	if b, _ := os.ReadFile(path); string(b) != "x" {
		t.Errorf("the regular file became %q", b)
	}
}
