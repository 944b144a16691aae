package fusefs

// Benchmarks for issue 7 (zero-downtime node plugin): what a relay between
// /dev/fuse and go-fuse costs on the metadata path, and how the kernel
// treats requests a dead server never answered. Nothing here is used by
// production code; docs/restart.md records the numbers and the choice.
//
//	sudo go test ./fusefs -run '^$' -bench 'Relay' -benchtime 3000x
//
// Each mount is made here with mount(2) on a /dev/fuse descriptor we opened
// ourselves, and go-fuse is handed a descriptor through its magic
// "/dev/fd/N" mountpoint (fuse/mount_linux.go: mount, parseFuseFd), so every
// variant has the same mount options:
//
//   - direct: go-fuse reads the /dev/fuse descriptor itself (as Mount does);
//   - relay:  a thin loop of ours owns /dev/fuse and feeds go-fuse through a
//     SOCK_SEQPACKET socketpair; go-fuse's descriptor is the socket, so
//     fuse.NewServer reads INIT from the socket (server.go: handleInit);
//   - proto:  a loop of ours reads /dev/fuse and calls go-fuse's
//     EXPERIMENTAL fuse.ProtocolServer.HandleRequest (what its virtiofs
//     package does), no socket hop.

import (
	"encoding/binary"
	"fmt"
	"io"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
)

// FUSE opcodes and constants the relay needs (include/uapi/linux/fuse.h;
// more in kernel.go).
const (
	opLookup = 1
	opMkdir  = 9

	relayMaxWrite = 128 << 10
	relayBufSize  = relayMaxWrite + 64<<10
)

var le = binary.LittleEndian

// hasReply says whether the kernel waits for a reply to op.
func hasReply(op uint32) bool {
	return op != opForget && op != opBatchForget && op != opInterrupt && op != opNotifyReply
}

// benchMountOptions mirrors Mount's fuse.MountOptions, except that
// passthrough is off everywhere (the relay cannot register backing files
// through go-fuse: see BenchmarkRelayPassthrough) so that every variant
// serves the same requests, and splice is off (a splice into a SEQPACKET
// socket would not keep the reply one message).
func benchMountOptions(passthrough bool) *fuse.MountOptions {
	mo := &fuse.MountOptions{
		AllowOther:           true,
		Options:              []string{"default_permissions"},
		FsName:               "csi-memfs-relay-bench",
		Name:                 "memfs",
		MaxWrite:             relayMaxWrite,
		MaxReadAhead:         1 << 20,
		MaxBackground:        64,
		DisableReadDirPlus:   true,
		EnableSymlinkCaching: true,
		ExtraCapabilities:    capHandleKillprivV2 | fuse.CAP_DIRECT_IO_ALLOW_MMAP,
		DisabledCapabilities: fuse.CAP_PASSTHROUGH,
		DisableSplice:        true,
		Logger:               log.New(io.Discard, "", 0),
	}
	if passthrough {
		mo.DisabledCapabilities = 0
	}
	return mo
}

// reqCounter is an Observer that counts requests, to report round trips per
// operation.
type reqCounter struct {
	n      atomic.Int64
	mu     sync.Mutex
	byName map[string]int
}

func (c *reqCounter) ObserveOp(op string, _ time.Duration, _ syscall.Errno) {
	c.n.Add(1)
	c.mu.Lock()
	if c.byName == nil {
		c.byName = map[string]int{}
	}
	c.byName[op]++
	c.mu.Unlock()
}

// take returns and resets the per-opcode counts.
func (c *reqCounter) take() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := c.byName
	c.byName = nil
	return m
}

// benchMount is one memfs volume mounted by one of the variants.
type benchMount struct {
	mnt    string
	layer  *memfs.Layer
	raw    *rawFS
	srv    *fuse.Server
	relay  *relay
	dev    int // the real /dev/fuse descriptor (owned by srv when direct)
	ops    *reqCounter
	closed func()
	// passthrough: the mount negotiates FUSE passthrough.
	passthrough bool
}

// mountDevFuse opens /dev/fuse and mounts it on mnt with the options Mount
// uses, returning the descriptor. The kernel queues INIT at once.
func mountDevFuse(tb testing.TB, mnt string) int {
	tb.Helper()
	dev, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		tb.Fatal(err)
	}
	data := fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,max_read=%d,allow_other,default_permissions", dev, relayMaxWrite)
	if err := unix.Mount("csi-memfs-relay-bench", mnt, "fuse.memfs", unix.MS_NOSUID|unix.MS_NODEV, data); err != nil {
		unix.Close(dev)
		tb.Fatalf("mount fuse on %s: %v", mnt, err)
	}
	return dev
}

// newBenchMount mounts a fresh memfs volume served the given way.
func newBenchMount(tb testing.TB, variant string, passthrough bool) *benchMount {
	tb.Helper()
	requireFUSE(tb)
	base := tb.TempDir()
	l, err := memfs.New(filepath.Join(base, "upper"), memfs.Options{Size: 1 << 30})
	if err != nil {
		tb.Fatal(err)
	}
	m := &benchMount{mnt: filepath.Join(base, "mnt"), layer: l, ops: &reqCounter{}, passthrough: passthrough}
	os.Mkdir(m.mnt, 0o755)
	m.raw = newRawFS(l, Options{DisablePassthrough: !passthrough, Observer: m.ops}, benchHandles(tb))
	m.dev = mountDevFuse(tb, m.mnt)
	switch variant {
	case "direct":
		// go-fuse owns and reads the device, as in Mount.
		m.srv, err = fuse.NewServer(m.raw, fmt.Sprintf("/dev/fd/%d", m.dev), benchMountOptions(passthrough))
		if err != nil {
			tb.Fatal(err)
		}
		go m.srv.Serve()
		m.closed = m.srv.Wait
	case "relay":
		m.relay, err = startRelay(m.dev)
		if err != nil {
			tb.Fatal(err)
		}
		m.srv, err = m.relay.attach(m.raw, passthrough)
		if err != nil {
			tb.Fatal(err)
		}
		m.closed = m.relay.wait
	case "proto":
		m.closed = serveProto(m.dev, m.raw)
	case "session":
		// The serving loop Mount uses.
		s, err := newSession(m.dev, m.raw, benchMountOptions(passthrough))
		if err == nil {
			err = s.readInit()
		}
		if err != nil {
			tb.Fatal(err)
		}
		s.serve()
		m.closed = func() { s.wait(); s.close() }
	default:
		tb.Fatalf("unknown variant %q", variant)
	}
	tb.Cleanup(func() {
		if err := unix.Unmount(m.mnt, 0); err != nil {
			unix.Unmount(m.mnt, unix.MNT_DETACH)
		}
		m.closed()
		l.Close()
	})
	return m
}

// relay owns the real /dev/fuse descriptor and forwards every request to
// the go-fuse server currently attached through a SOCK_SEQPACKET pair, and
// every reply back. It records INIT and its reply, and knows which
// requests are unanswered. The hooks simulate a server that dies.
type relay struct {
	dev int

	mu   sync.Mutex
	cond *sync.Cond
	// sock is our end of the pair go-fuse reads; -1 while no server is
	// attached (requests wait).
	sock int
	// inflight maps forwarded, unanswered requests to their opcodes.
	inflight map[uint64]uint32

	initReq, initReply []byte

	// dropReq, if set to an opcode, makes the relay swallow the next
	// request with that opcode, as if a server had read it and died; the
	// unique is sent on dropped. dropReply does the same to a reply.
	dropReq, dropReply atomic.Uint32
	dropped            chan uint64
	resent             atomic.Int64 // requests seen with FUSE_UNIQUE_RESEND

	down sync.WaitGroup // the /dev/fuse reader
	up   sync.WaitGroup // socket readers
}

// startRelay reads INIT from dev and starts forwarding once a server is
// attached.
func startRelay(dev int) (*relay, error) {
	r := &relay{dev: dev, sock: -1, inflight: map[uint64]uint32{}, dropped: make(chan uint64, 16)}
	r.cond = sync.NewCond(&r.mu)
	buf := make([]byte, relayBufSize)
	n, err := unix.Read(dev, buf)
	if err != nil {
		return nil, fmt.Errorf("read INIT: %w", err)
	}
	if le.Uint32(buf[4:]) != opInit {
		return nil, fmt.Errorf("first request is opcode %d, not INIT", le.Uint32(buf[4:]))
	}
	r.initReq = append([]byte(nil), buf[:n]...)
	r.down.Add(1)
	go r.downLoop()
	return r, nil
}

// attach starts a fresh go-fuse server behind the relay. The first time it
// answers the kernel's INIT; later (a takeover) it replays the recorded
// INIT into the new server and discards the reply, which the kernel must
// not see twice.
func (r *relay) attach(raw *rawFS, passthrough bool) (*fuse.Server, error) {
	fds, err := unix.Socketpair(unix.AF_UNIX, unix.SOCK_SEQPACKET|unix.SOCK_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	for _, fd := range fds {
		// Room for a MaxWrite request or READ reply in one message.
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_SNDBUFFORCE, 4*relayBufSize)
		unix.SetsockoptInt(fd, unix.SOL_SOCKET, unix.SO_RCVBUFFORCE, 4*relayBufSize)
	}
	if _, err := unix.Write(fds[0], r.initReq); err != nil {
		return nil, err
	}
	// NewServer reads INIT from the socket and answers it before
	// returning; go-fuse takes ownership of fds[1].
	srv, err := fuse.NewServer(raw, fmt.Sprintf("/dev/fd/%d", fds[1]), benchMountOptions(passthrough))
	if err != nil {
		unix.Close(fds[0])
		return nil, err
	}
	buf := make([]byte, relayBufSize)
	n, err := unix.Read(fds[0], buf)
	if err != nil {
		return nil, fmt.Errorf("read INIT reply: %w", err)
	}
	if r.initReply == nil {
		r.initReply = append([]byte(nil), buf[:n]...)
		if _, err := unix.Write(r.dev, r.initReply); err != nil {
			return nil, fmt.Errorf("write INIT reply: %w", err)
		}
	}
	go srv.Serve()
	r.up.Add(1)
	go r.upLoop(fds[0])
	r.mu.Lock()
	r.sock = fds[0]
	r.cond.Broadcast()
	r.mu.Unlock()
	return srv, nil
}

// detach stops forwarding requests, waits until every forwarded one is
// answered, and disconnects the server: a planned handover's first half.
// The server's loops see end of file and exit.
func (r *relay) detach(srv *fuse.Server) {
	r.mu.Lock()
	sock := r.sock
	r.sock = -1
	for len(r.inflight) > 0 {
		r.cond.Wait()
	}
	r.mu.Unlock()
	unix.Shutdown(sock, unix.SHUT_RDWR)
	srv.Wait()
	r.up.Wait()
	unix.Close(sock)
	r.up = sync.WaitGroup{}
}

// downLoop forwards requests from the kernel. One reader: the loop only
// copies.
func (r *relay) downLoop() {
	defer r.down.Done()
	buf := make([]byte, relayBufSize)
	for {
		n, err := unix.Read(r.dev, buf)
		if err == unix.EINTR || err == unix.ENOENT {
			continue
		}
		if err != nil { // ENODEV: unmounted
			r.mu.Lock()
			if r.sock >= 0 {
				unix.Shutdown(r.sock, unix.SHUT_RDWR)
			}
			r.mu.Unlock()
			return
		}
		msg := buf[:n]
		op, unique := le.Uint32(msg[4:]), le.Uint64(msg[8:])
		if unique&uniqueResend != 0 {
			r.resent.Add(1)
		}
		if d := r.dropReq.Load(); d != 0 && d == op && r.dropReq.CompareAndSwap(d, 0) {
			r.dropped <- unique
			continue
		}
		r.mu.Lock()
		for r.sock < 0 {
			r.cond.Wait()
		}
		if hasReply(op) {
			r.inflight[unique] = op
		}
		sock := r.sock
		r.mu.Unlock()
		if _, err := unix.Write(sock, msg); err != nil {
			log.Printf("relay: forward opcode %d: %v", op, err)
		}
	}
}

// upLoop forwards one server's replies (and notifications) to the kernel.
func (r *relay) upLoop(sock int) {
	defer r.up.Done()
	buf := make([]byte, relayBufSize)
	for {
		n, err := unix.Read(sock, buf)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return
		}
		msg := buf[:n]
		unique := le.Uint64(msg[8:])
		r.mu.Lock()
		op, ok := r.inflight[unique]
		delete(r.inflight, unique)
		if len(r.inflight) == 0 {
			r.cond.Broadcast()
		}
		r.mu.Unlock()
		if d := r.dropReply.Load(); ok && d != 0 && d == op && r.dropReply.CompareAndSwap(d, 0) {
			r.dropped <- unique
			continue
		}
		// ENOENT: the request was interrupted and is gone.
		if _, err := unix.Write(r.dev, msg); err != nil && err != unix.ENOENT {
			log.Printf("relay: reply opcode %d: %v", op, err)
		}
	}
}

// resend asks the kernel to requeue every request that was read from the
// connection and not answered (FUSE_NOTIFY_RESEND).
func (r *relay) resend() error {
	msg := make([]byte, 16)
	le.PutUint32(msg[0:], 16)
	le.PutUint32(msg[4:], notifyResend)
	_, err := unix.Write(r.dev, msg)
	return err
}

func (r *relay) wait() {
	r.down.Wait()
	r.up.Wait()
	unix.Close(r.dev)
}

// serveProto serves dev with our own read loop and go-fuse's ProtocolServer
// (no *fuse.Server, so rawFS.Init is never called: passthrough stays off).
// It returns a function that waits for the loop to end.
func serveProto(dev int, raw *rawFS) func() {
	ps := fuse.NewProtocolServer(raw, benchMountOptions(false))
	var wg sync.WaitGroup
	var initDone sync.WaitGroup
	initDone.Add(1)
	reader := func(first bool) {
		defer wg.Done()
		in := make([]byte, relayBufSize)
		out := make([]byte, relayBufSize)
		for {
			n, err := unix.Read(dev, in)
			if err == unix.EINTR || err == unix.ENOENT {
				continue
			}
			if err != nil {
				return
			}
			w, st := ps.HandleRequest([][]byte{in[:n]}, [][]byte{out})
			if st.Ok() && w > 0 {
				unix.Write(dev, out[:w])
			}
			if first {
				first = false
				initDone.Done()
			}
		}
	}
	// INIT first, alone; then as many readers as go-fuse would start on
	// two CPUs.
	wg.Add(1)
	go reader(true)
	initDone.Wait()
	for i := 0; i < 2; i++ {
		wg.Add(1)
		go reader(false)
	}
	return func() { wg.Wait(); unix.Close(dev) }
}

// benchHandles returns a fresh handle table, closed when tb ends.
func benchHandles(tb testing.TB) *handleTable {
	t, err := newHandleTable()
	if err != nil {
		tb.Fatal(err)
	}
	tb.Cleanup(t.close)
	return t
}

func loadAvg() float64 {
	b, _ := os.ReadFile("/proc/loadavg")
	f, _ := strconv.ParseFloat(strings.Fields(string(b) + " 0")[0], 64)
	return f
}

func dropDentries(tb testing.TB) {
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0); err != nil {
		tb.Fatal(err)
	}
}

// BenchmarkRelayMetadata times metadata operations on the same memfs layer
// served directly, through the relay, and through our own loop with
// ProtocolServer. The variants alternate for each operation, and the whole
// alternation is repeated RELAY_BENCH_ROUNDS times (default 5; go test's
// -count would repeat each sub-benchmark back to back). Reported: ns/op, FUSE requests per
// operation (rt/op) and the 1-minute load average at the end (load1).
func BenchmarkRelayMetadata(b *testing.B) {
	variants := []string{"direct", "relay", "proto"}
	mounts := map[string]*benchMount{}
	for _, v := range variants {
		mounts[v] = newBenchMount(b, v, false)
	}
	rounds := 5
	if n, err := strconv.Atoi(os.Getenv("RELAY_BENCH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	for round := 1; round <= rounds; round++ {
		for _, op := range []string{"stat-after-write", "create", "lookup-uncached"} {
			for _, v := range variants {
				m := mounts[v]
				b.Run(fmt.Sprintf("%s/%s/round=%d", op, v, round), func(b *testing.B) {
					benchMetadataOp(b, m, op)
				})
			}
		}
	}
}

func benchMetadataOp(b *testing.B, m *benchMount, op string) {
	dir, err := os.MkdirTemp(m.mnt, op)
	if err != nil {
		b.Fatal(err)
	}
	names := make([]string, b.N)
	for i := range names {
		names[i] = filepath.Join(dir, strconv.Itoa(i))
	}
	var (
		st unix.Stat_t
		fd = -1
	)
	switch op {
	case "stat-after-write":
		fd, err = unix.Open(filepath.Join(dir, "f"), unix.O_CREAT|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
		if err != nil {
			b.Fatal(err)
		}
		defer unix.Close(fd)
	case "lookup-uncached":
		for _, n := range names {
			fd, err := unix.Creat(n, 0o644)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
		dropDentries(b)
		// Let the FORGETs the eviction caused drain.
		time.Sleep(100 * time.Millisecond)
	}
	one := []byte{'x'}
	m.ops.take()
	before := m.ops.n.Load()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		switch op {
		case "stat-after-write":
			// The write invalidates the cached attributes, so the
			// fstat is a GETATTR: two round trips.
			if _, err := unix.Pwrite(fd, one, int64(i%4096)); err != nil {
				b.Fatal(err)
			}
			if err := unix.Fstat(fd, &st); err != nil {
				b.Fatal(err)
			}
		case "create":
			fd, err := unix.Open(names[i], unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o644)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		case "lookup-uncached":
			if err := unix.Lstat(names[i], &st); err != nil {
				b.Fatal(err)
			}
		}
	}
	b.StopTimer()
	b.ReportMetric(float64(m.ops.n.Load()-before)/float64(b.N), "rt/op")
	b.Logf("requests served during %d ops: %v", b.N, m.ops.take())
	b.ReportMetric(loadAvg(), "load1")
}

// BenchmarkRelayResend shows what happens to a request that a server read
// and never answered (the relay swallows it, which is the kernel state a
// SIGKILLed server leaves behind while another process keeps the device
// open): the caller waits, and FUSE_NOTIFY_RESEND makes the kernel queue
// it again (unique | FUSE_UNIQUE_RESEND), so the next server answers it.
// ns/op is the time from writing the notification to the caller's stat
// returning. It then checks, once, that a SIGKILLed caller cannot exit
// while such a request is outstanding, and what a caller sees when a
// MKDIR's reply (not the request) was lost and the request is resent.
func BenchmarkRelayResend(b *testing.B) {
	m := newBenchMount(b, "relay", false)
	r := m.relay
	dir := filepath.Join(m.mnt, "resend")
	os.Mkdir(dir, 0o755)
	names := make([]string, b.N)
	for i := range names {
		names[i] = filepath.Join(dir, fmt.Sprint(i))
		os.WriteFile(names[i], nil, 0o644)
	}
	dropDentries(b)
	time.Sleep(100 * time.Millisecond)
	var waited time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		r.dropReq.Store(opLookup)
		done := make(chan error, 1)
		go func() {
			var st unix.Stat_t
			done <- unix.Lstat(names[i], &st)
		}()
		<-r.dropped
		b.StopTimer()
		select {
		case err := <-done:
			b.Fatalf("stat returned (%v) although its LOOKUP was never answered", err)
		case <-time.After(10 * time.Millisecond):
		}
		waited += 10 * time.Millisecond
		b.StartTimer()
		if err := r.resend(); err != nil {
			b.Fatalf("FUSE_NOTIFY_RESEND: %v", err)
		}
		if err := <-done; err != nil {
			b.Fatalf("stat after resend: %v", err)
		}
	}
	b.StopTimer()
	// NOTIFY_RESEND requeues every unanswered request of the
	// connection, also ones the live server was serving at that moment
	// (other processes on this machine stat mounts now and then): those
	// are served twice, and the first reply gets ENOENT.
	if got := r.resent.Load(); got < int64(b.N) {
		b.Errorf("%d requests came back with FUSE_UNIQUE_RESEND, want %d", got, b.N)
	} else {
		b.Logf("%d resends, %d requests came back with FUSE_UNIQUE_RESEND", b.N, got)
	}
	b.ReportMetric(loadAvg(), "load1")

	// A caller killed with SIGKILL while its request is unanswered.
	name := filepath.Join(dir, "victim")
	os.WriteFile(name, nil, 0o644)
	dropDentries(b)
	time.Sleep(100 * time.Millisecond)
	r.dropReq.Store(opLookup)
	cmd := exec.Command("stat", name)
	if err := cmd.Start(); err != nil {
		b.Fatal(err)
	}
	exited := make(chan struct{})
	go func() { cmd.Wait(); close(exited) }()
	<-r.dropped
	cmd.Process.Signal(syscall.SIGKILL)
	select {
	case <-exited:
		b.Logf("SIGKILLed caller exited although its request was unanswered")
	case <-time.After(2 * time.Second):
		state, _ := os.ReadFile(fmt.Sprintf("/proc/%d/stat", cmd.Process.Pid))
		f := strings.Fields(string(state) + " ? ? ?")
		b.Logf("SIGKILLed caller still there 2 s later, state %s (the request is answered only by a resend)", f[2])
		start := time.Now()
		r.resend()
		<-exited
		b.Logf("killed caller exited %v after FUSE_NOTIFY_RESEND", time.Since(start))
	}

	// A MKDIR the server performed but whose reply was lost, resent: the
	// successor performs it again.
	r.dropReply.Store(opMkdir)
	mk := make(chan error, 1)
	go func() { mk <- os.Mkdir(filepath.Join(dir, "made-once"), 0o755) }()
	<-r.dropped
	r.resend()
	b.Logf("mkdir whose reply was lost, after resend: %v", <-mk)
}

// BenchmarkRelayHandover measures a planned takeover behind the relay: stop
// forwarding, wait for the server's requests in flight, disconnect it,
// start a fresh go-fuse server with a fresh rawFS on the same layer,
// replay the recorded INIT into it, resume. ns/op is the pause; after
// each handover a GETATTR of a node the kernel learned from an earlier
// server must be answered by the new one.
func BenchmarkRelayHandover(b *testing.B) {
	m := newBenchMount(b, "relay", false)
	name := filepath.Join(m.mnt, "kept")
	if err := os.WriteFile(name, []byte("data"), 0o644); err != nil {
		b.Fatal(err)
	}
	srv := m.srv
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		m.relay.detach(srv)
		var err error
		srv, err = m.relay.attach(newRawFS(m.layer, Options{DisablePassthrough: true, Observer: m.ops}, benchHandles(b)), false)
		if err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		// Write, so that the next stat is a GETATTR of an inode the
		// kernel holds from a previous server.
		if err := os.WriteFile(name, []byte(fmt.Sprint(i)), 0o644); err != nil {
			b.Fatal(err)
		}
		if _, err := os.Stat(name); err != nil {
			b.Fatal(err)
		}
		b.StartTimer()
	}
	b.StopTimer()
	m.srv = srv
	b.ReportMetric(loadAvg(), "load1")
}

// BenchmarkRelayPassthrough shows which descriptor the passthrough ioctl
// needs. Behind the relay go-fuse's Server.RegisterBackingFd issues
// FUSE_DEV_IOC_BACKING_OPEN on its socket, which fails, and rawFS turns
// passthrough off for good; the same ioctl on the real /dev/fuse
// descriptor, which the relay (or any process holding a copy of it) can
// issue, succeeds. ns/op is one BACKING_OPEN + BACKING_CLOSE on /dev/fuse.
func BenchmarkRelayPassthrough(b *testing.B) {
	m := newBenchMount(b, "relay", true)
	if !m.raw.passthroughActive() {
		b.Skip("the kernel did not offer FUSE passthrough")
	}
	// An open through the mount: rawFS asks go-fuse to register the
	// backing file, go-fuse issues the ioctl on its socket.
	if err := os.WriteFile(filepath.Join(m.mnt, "p"), []byte("x"), 0o644); err != nil {
		b.Fatal(err)
	}
	b.Logf("rawFS passthrough after one open behind the relay: %v", m.raw.passthroughActive())
	f, err := os.CreateTemp(m.layer.Dir(), "backing")
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	type backingMap struct {
		fd, flags int32
		padding   uint64
	}
	_, errno := m.srv.RegisterBackingFd(&fuse.BackingMap{Fd: int32(f.Fd())})
	b.Logf("BACKING_OPEN through go-fuse behind the relay (on the socket): %v", errno)
	if got := m.srv.KernelSettings().Flags64() & fuse.CAP_PASSTHROUGH; got == 0 {
		b.Logf("kernel does not offer CAP_PASSTHROUGH")
	}
	bm := backingMap{fd: int32(f.Fd())}
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		id, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(m.relay.dev), iocBackingOpen, uintptr(unsafe.Pointer(&bm)))
		if errno != 0 {
			b.Fatalf("BACKING_OPEN on /dev/fuse: %v", errno)
		}
		id32 := int32(id)
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(m.relay.dev), iocBackingClose, uintptr(unsafe.Pointer(&id32))); errno != 0 {
			b.Fatalf("BACKING_CLOSE: %v", errno)
		}
	}
	b.StopTimer()
	b.ReportMetric(loadAvg(), "load1")
}

// BenchmarkRelayRoundTrip isolates one round trip: statfs(2) on a FUSE
// mount is one STATFS request every time (the kernel caches nothing). The
// variants (and "session", the loop Mount uses) take turns every 100 calls, so load changes hit them
// alike; each reports the median over the turns of the mean time per
// call (µs/rt). b.N calls per variant.
func BenchmarkRelayRoundTrip(b *testing.B) {
	variants := []string{"direct", "relay", "proto", "session"}
	mounts := map[string]*benchMount{}
	for _, v := range variants {
		mounts[v] = newBenchMount(b, v, false)
	}
	const turn = 100
	means := map[string][]float64{}
	var st unix.Statfs_t
	b.ResetTimer()
	for done := 0; done < b.N; done += turn {
		n := min(turn, b.N-done)
		for _, v := range variants {
			mnt := mounts[v].mnt
			start := time.Now()
			for i := 0; i < n; i++ {
				if err := unix.Statfs(mnt, &st); err != nil {
					b.Fatal(err)
				}
			}
			means[v] = append(means[v], float64(time.Since(start).Microseconds())/float64(n))
		}
	}
	b.StopTimer()
	for _, v := range variants {
		m := means[v]
		slices.Sort(m)
		b.ReportMetric(m[len(m)/2], v+"-µs/rt")
	}
	b.ReportMetric(loadAvg(), "load1")
}
