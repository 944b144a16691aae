package handoff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"sync/atomic"
	"testing"
	"time"
)

// startHolder serves a Holder on a fresh socket; Cleanup stops it, checks
// that Serve returned nil, and closes it.
func startHolder(t *testing.T, deadline time.Duration, fallback func(*os.File, <-chan struct{}) error) (*Holder, string, context.CancelFunc) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "holder.sock")
	h, stop := startHolderAt(t, path, deadline, fallback)
	return h, path, stop
}

// startHolderAt is startHolder on the socket path.
func startHolderAt(t *testing.T, path string, deadline time.Duration, fallback func(*os.File, <-chan struct{}) error) (*Holder, context.CancelFunc) {
	t.Helper()
	h, err := NewHolder(path)
	if err != nil {
		t.Fatal(err)
	}
	h.Deadline, h.Fallback = deadline, fallback
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- h.Serve(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("Serve: %v", err)
				}
			case <-time.After(5 * time.Second):
				t.Error("Serve still running 5s after its context ended")
			}
			h.Close()
		})
	}
	t.Cleanup(stop)
	return h, stop
}

func dial(t *testing.T, path string) *Client {
	t.Helper()
	cl, err := Dial(path)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { cl.Close() })
	return cl
}

// readEOF checks that every write end of r's pipe is closed.
func readEOF(t *testing.T, r *os.File, what string) {
	t.Helper()
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := r.Read(make([]byte, 16)); err != io.EOF {
		t.Errorf("%s: read %d bytes, %v; want EOF (every copy of the write end closed)", what, n, err)
	}
}

func TestHolder(t *testing.T) {
	h, path, _ := startHolder(t, 0, nil)
	before := openFds(t)
	cl := dial(t, path)

	r1, w1 := testPipe(t)
	if err := cl.Put(Bundle{ID: "vol-b", Meta: []byte("meta-b"), Files: []*os.File{w1}}); err != nil {
		t.Fatal(err)
	}
	w1.Close() // the holder has its own copy
	if err := cl.Put(Bundle{ID: "vol-a"}); err != nil {
		t.Fatal(err)
	}
	bs, err := cl.List()
	if err != nil || len(bs) != 2 || bs[0].ID != "vol-a" || bs[1].ID != "vol-b" || string(bs[1].Meta) != "meta-b" ||
		len(bs[0].Files) != 0 || len(bs[1].Files) != 1 {
		t.Fatalf("List: %+v, %v", bs, err)
	}
	checkThrough(t, bs[1].Files[0], r1, "through the held pipe")
	bs[1].Close()

	// A Put of the same ID replaces the bundle and closes its
	// descriptors.
	r2, w2 := testPipe(t)
	if err := cl.Put(Bundle{ID: "vol-b", Meta: []byte("meta-b2"), Files: []*os.File{w2, w2}}); err != nil {
		t.Fatal(err)
	}
	w2.Close()
	readEOF(t, r1, "the replaced bundle's pipe")
	bs, err = cl.List()
	if err != nil || len(bs) != 2 || string(bs[1].Meta) != "meta-b2" || len(bs[1].Files) != 2 {
		t.Fatalf("List after replacing: %+v, %v", bs, err)
	}
	for _, b := range bs {
		b.Close()
	}

	// Del closes them too; deleting a missing bundle is fine.
	for _, id := range []string{"vol-b", "vol-b", "missing"} {
		if err := cl.Del(id); err != nil {
			t.Errorf("Del %s: %v", id, err)
		}
	}
	readEOF(t, r2, "the deleted bundle's pipe")
	if h.Len() != 1 {
		t.Errorf("Len = %d, want 1", h.Len())
	}

	// Requests the holder refuses leave the connection usable.
	var pe *PeerError
	if err := cl.Put(Bundle{ID: "x", Meta: make([]byte, MaxMeta+1)}); !errors.Is(err, ErrBadMessage) {
		t.Errorf("Put of too much meta: %v", err)
	}
	if err := cl.Del(""); !errors.Is(err, ErrBadMessage) {
		t.Errorf("Del without an id: %v", err)
	}
	c, err := DialConn(path)
	if err != nil {
		t.Fatal(err)
	}
	for _, m := range []Msg{
		{Op: "bogus"},
		{Op: opPut},
		{Op: opDel, ID: "vol-a", Files: []*os.File{r2}},
		{Op: opList, Files: []*os.File{r2}},
	} {
		if err := c.Send(m); err != nil {
			t.Fatal(err)
		}
		if _, err := c.Expect(OpAck); !errors.As(err, &pe) {
			t.Errorf("%s request: %v, want a refusal", m.Op, err)
		}
	}
	if _, _, err := c.uc.WriteMsgUnix([]byte("garbage"), nil, nil); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Expect(OpAck); !errors.As(err, &pe) {
		t.Errorf("a bad message: %v, want a refusal", err)
	}
	if err := c.Send(Msg{Op: opList}); err != nil {
		t.Fatal(err)
	}
	if bs, err := c.RecvBundles(); err != nil || len(bs) != 1 {
		t.Errorf("List after refusals: %+v, %v", bs, err)
	}
	c.Close()

	// The holder has what it holds and nothing more: vol-a, no
	// descriptors.
	cl.Close()
	r1.Close()
	r2.Close()
	time.Sleep(50 * time.Millisecond)
	if after := openFds(t); len(after) != len(before) {
		t.Errorf("%d descriptors open before, %d after: %v, %v", len(before), len(after), before, after)
	}
}

// TestHolderClients: clients at once, and a client whose holder went.
func TestHolderClients(t *testing.T) {
	h, path, stop := startHolder(t, 0, nil)
	_, w := testPipe(t)
	shared := dial(t, path)
	var wg sync.WaitGroup
	for i := range 4 {
		cl := shared
		if i%2 == 0 {
			cl = dial(t, path)
		}
		wg.Add(1)
		go func() {
			defer wg.Done()
			for j := range 20 {
				id := fmt.Sprintf("vol-%d-%d", i, j)
				if err := cl.Put(Bundle{ID: id, Files: []*os.File{w}}); err != nil {
					t.Error(err)
					return
				}
				if j%2 == 0 {
					if err := cl.Del(id); err != nil {
						t.Error(err)
					}
				}
				if bs, err := cl.List(); err != nil {
					t.Error(err)
				} else {
					for _, b := range bs {
						b.Close()
					}
				}
			}
		}()
	}
	wg.Wait()
	if h.Len() != 40 {
		t.Errorf("Len = %d, want 40", h.Len())
	}
	stop()
	if _, err := shared.List(); err == nil {
		t.Error("List after the holder stopped: no error")
	}
	if _, err := shared.List(); err == nil {
		t.Error("List again: no error")
	}
}

// TestHolderFallback: once no client has been connected for the deadline,
// the holder runs the fallback on every held FUSE device, and on nothing
// else; a client that connects ends it before its requests are answered.
func TestHolderFallback(t *testing.T) {
	dev, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("needs /dev/fuse: %v", err)
	}
	started := make(chan time.Time, 10)
	var running atomic.Int32
	fallback := func(f *os.File, stop <-chan struct{}) error {
		running.Add(1)
		defer running.Add(-1)
		rc, _ := f.SyscallConn()
		rc.Control(func(fd uintptr) {
			if !isFUSEDevice(int(fd)) {
				t.Errorf("fallback got %s, not a FUSE device", f.Name())
			}
		})
		started <- time.Now()
		<-stop
		// A fallback that takes its time to notice stop: the holder
		// must still wait for it.
		time.Sleep(50 * time.Millisecond)
		return nil
	}
	const deadline = 300 * time.Millisecond
	_, path, stop := startHolder(t, deadline, fallback)
	_, w := testPipe(t)
	cl := dial(t, path)
	if err := cl.Put(Bundle{ID: "vol", Files: []*os.File{dev, w}}); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	r2, w2 := testPipe(t)
	if err := cl.Put(Bundle{ID: "vol-2", Files: []*os.File{w2}}); err != nil {
		t.Fatal(err)
	}
	if isFUSEDevice(int(r2.Fd())) {
		t.Error("a pipe is a FUSE device?")
	}

	left := time.Now()
	cl.Close()
	select {
	case at := <-started:
		if d := at.Sub(left); d < deadline {
			t.Errorf("fallback started %v after the client left, before the deadline %v", d, deadline)
		}
	case <-time.After(deadline + 5*time.Second):
		t.Fatal("no fallback 5s after the deadline")
	}
	select {
	case <-started:
		t.Error("a second fallback: only one FUSE device is held")
	case <-time.After(100 * time.Millisecond):
	}

	cl = dial(t, path)
	bs, err := cl.List()
	if err != nil || len(bs) != 2 {
		t.Fatalf("List: %+v, %v", bs, err)
	}
	if n := running.Load(); n != 0 {
		t.Errorf("%d fallbacks still running when List was answered", n)
	}
	for _, b := range bs {
		b.Close()
	}
	// No fallback while a client is connected.
	select {
	case <-started:
		t.Error("fallback started while a client was connected")
	case <-time.After(2 * deadline):
	}
	// The last client leaves: the deadline runs again.
	cl.Close()
	select {
	case <-started:
	case <-time.After(deadline + 5*time.Second):
		t.Fatal("no fallback after the second client left")
	}
	// The end of Serve ends the fallback.
	stop()
	if n := running.Load(); n != 0 {
		t.Errorf("%d fallbacks still running after Serve returned", n)
	}
}

// TestHolderSocketReplaced: a new holder takes over the socket's path
// while the old one serves on; new clients reach the new one.
func TestHolderSocketReplaced(t *testing.T) {
	_, path, _ := startHolder(t, 0, nil)
	old := dial(t, path)
	if err := old.Put(Bundle{ID: "old"}); err != nil {
		t.Fatal(err)
	}
	h2, _ := startHolderAt(t, path, 0, nil)
	if err := dial(t, path).Put(Bundle{ID: "new"}); err != nil {
		t.Fatal(err)
	}
	if bs, err := old.List(); err != nil || len(bs) != 1 || bs[0].ID != "old" {
		t.Errorf("old holder: %+v, %v", bs, err)
	}
	if h2.Len() != 1 {
		t.Errorf("new holder holds %d", h2.Len())
	}
}

// TestHolderReclaimsItsSocket: a newer holder takes the socket's path and
// then goes (a rolling update undone); the older one takes the path back,
// so a plugin restarting later finds the sessions it kept.
func TestHolderReclaimsItsSocket(t *testing.T) {
	old := reclaimPeriod
	t.Cleanup(func() { reclaimPeriod = old }) // after the holders stop
	reclaimPeriod = 20 * time.Millisecond
	_, path, _ := startHolder(t, 0, nil)
	if err := dial(t, path).Put(Bundle{ID: "old"}); err != nil {
		t.Fatal(err)
	}
	_, stopNew := startHolderAt(t, path, 0, nil)
	// While the newer holder lives, the path stays its own.
	time.Sleep(5 * reclaimPeriod)
	if bs, err := dial(t, path).List(); err != nil || len(bs) != 0 {
		t.Fatalf("the path reaches %+v, %v; want the newer, empty holder", bs, err)
	}
	stopNew() // its socket file stays, refusing connections
	deadline := time.Now().Add(5 * time.Second)
	for {
		if cl, err := Dial(path); err == nil {
			bs, err := cl.List()
			cl.Close()
			if err == nil && len(bs) == 1 && bs[0].ID == "old" {
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatal("the older holder did not take its socket back")
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestHolderProbeIsNoClient: a connection that sends nothing (another
// holder checking whether this one lives) neither ends the fallback nor
// delays it.
func TestHolderProbeIsNoClient(t *testing.T) {
	dev, err := os.OpenFile("/dev/fuse", os.O_RDWR, 0)
	if err != nil {
		t.Skipf("needs /dev/fuse: %v", err)
	}
	started, stopped := make(chan struct{}, 10), make(chan struct{}, 10)
	fallback := func(_ *os.File, stop <-chan struct{}) error {
		started <- struct{}{}
		<-stop
		stopped <- struct{}{}
		return nil
	}
	const deadline = 200 * time.Millisecond
	_, path, _ := startHolder(t, deadline, fallback)
	cl := dial(t, path)
	if err := cl.Put(Bundle{ID: "vol", Files: []*os.File{dev}}); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	cl.Close()
	// Probes all through the deadline: the fallback starts on time.
	for start := time.Now(); time.Since(start) < deadline+time.Second; {
		if abandoned(path) {
			t.Fatal("a live holder's socket looks abandoned")
		}
		select {
		case <-started:
			// Probes while it runs do not stop it.
			for range 5 {
				abandoned(path)
				time.Sleep(10 * time.Millisecond)
			}
			select {
			case <-stopped:
				t.Error("a probe stopped the fallback")
			default:
			}
			return
		default:
		}
		time.Sleep(20 * time.Millisecond)
	}
	t.Fatal("probes kept the fallback from starting")
}
