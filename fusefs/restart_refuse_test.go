package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// refuseTestMount mounts a FUSE connection of its own on a fresh directory
// and answers INIT with go-fuse's ProtocolServer; nothing serves it after
// that. Cleanup unmounts (detaching if busy) and closes the descriptor,
// which ends the connection and so any request still waiting.
func refuseTestMount(t *testing.T) (string, *os.File) {
	t.Helper()
	requireFUSE(t)
	mnt := t.TempDir()
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		t.Fatal(err)
	}
	dev := os.NewFile(uintptr(fd), "/dev/fuse")
	if err := unix.Mount("csi-memfs-refuse-test", mnt, "fuse.memfs", unix.MS_NOSUID|unix.MS_NODEV,
		fmt.Sprintf("fd=%d,rootmode=40000,user_id=0,group_id=0,allow_other", fd)); err != nil {
		dev.Close()
		t.Fatalf("mount: %v", err)
	}
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			unix.Unmount(mnt, unix.MNT_DETACH)
		}
		dev.Close()
	})
	buf := make([]byte, refuseBufSize)
	n, err := dev.Read(buf)
	if err != nil || n < inHeaderSize || binary.LittleEndian.Uint32(buf[4:]) != opInit {
		t.Fatalf("reading INIT: %d bytes, %v", n, err)
	}
	out := make([]byte, 4096)
	ps := fuse.NewProtocolServer(fuse.NewDefaultRawFileSystem(), &fuse.MountOptions{})
	w, st := ps.HandleRequest([][]byte{buf[:n]}, [][]byte{out})
	if !st.Ok() || w == 0 {
		t.Fatalf("answering INIT: %v", st)
	}
	if _, err := dev.Write(out[:w]); err != nil {
		t.Fatalf("replying to INIT: %v", err)
	}
	return mnt, dev
}

// startRefuse runs Refuse on dev and returns its stop channel and result.
func startRefuse(dev *os.File) (chan struct{}, chan error) {
	stop, done := make(chan struct{}), make(chan error, 1)
	go func() { done <- Refuse(dev, stop) }()
	return stop, done
}

func TestRefuse(t *testing.T) {
	mnt, dev := refuseTestMount(t)
	// A request queued before Refuse starts, as when the plugin died and
	// callers kept coming during the holder's deadline.
	early := make(chan error, 1)
	go func() {
		_, err := os.Lstat(filepath.Join(mnt, "early"))
		early <- err
	}()
	time.Sleep(100 * time.Millisecond)
	stop, done := startRefuse(dev)
	defer func() {
		select {
		case <-stop:
		default:
			close(stop)
			<-done
		}
	}()

	select {
	case err := <-early:
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("lstat queued before Refuse: %v, want EIO", err)
		}
	case <-time.After(2 * time.Second):
		t.Error("lstat queued before Refuse still waiting 2s after it started")
	}

	// Every request is answered at once with EIO: GETATTR of the root,
	// LOOKUPs (not cached, since they failed), STATFS.
	for _, name := range []string{"", "a", "a", "b/c"} {
		start := time.Now()
		_, err := os.Lstat(filepath.Join(mnt, name))
		if !errors.Is(err, syscall.EIO) {
			t.Errorf("lstat %q: %v, want EIO", name, err)
		}
		if d := time.Since(start); d > 2*time.Second {
			t.Errorf("lstat %q took %v", name, d)
		}
	}
	var sfs unix.Statfs_t
	if err := unix.Statfs(mnt, &sfs); err != unix.EIO {
		t.Errorf("statfs: %v, want EIO", err)
	}

	// Stopped, it returns soon and reads nothing more: a request waits in
	// the kernel.
	start := time.Now()
	close(stop)
	select {
	case err := <-done:
		if err != nil {
			t.Fatalf("Refuse: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Fatal("Refuse still running 2s after stop")
	}
	if d := time.Since(start); d > time.Second {
		t.Errorf("Refuse returned %v after stop, want about %v", d, refusePoll)
	}
	waiting := make(chan error, 1)
	go func() {
		_, err := os.Lstat(filepath.Join(mnt, "queued"))
		waiting <- err
	}()
	select {
	case err := <-waiting:
		t.Fatalf("lstat returned (%v) with no server", err)
	case <-time.After(300 * time.Millisecond):
	}

	// The next server finds the request queued, and dev as blocking as it
	// was: here the test is the server, and it answers ENOENT.
	flags, err := unix.FcntlInt(dev.Fd(), unix.F_GETFL, 0)
	if err != nil || flags&unix.O_NONBLOCK != 0 {
		t.Errorf("dev flags after Refuse: %#x, %v; want O_NONBLOCK clear again", flags, err)
	}
	buf := make([]byte, refuseBufSize)
	for {
		pfd := []unix.PollFd{{Fd: int32(dev.Fd()), Events: unix.POLLIN}}
		if n, err := unix.Poll(pfd, 5000); n != 1 {
			t.Fatalf("no request queued (poll: %v)", err)
		}
		n, err := dev.Read(buf)
		if err != nil {
			t.Fatalf("reading the queued request: %v", err)
		}
		var out [outHeaderSize]byte
		errorReply(out[:], binary.LittleEndian.Uint64(buf[8:]), unix.ENOENT)
		if op := binary.LittleEndian.Uint32(buf[4:]); refuseNeedsReply(op) {
			dev.Write(out[:])
		}
		if n >= inHeaderSize && binary.LittleEndian.Uint32(buf[4:]) == 1 { // LOOKUP
			break
		}
	}
	select {
	case err := <-waiting:
		if !errors.Is(err, syscall.ENOENT) {
			t.Errorf("queued lstat: %v, want ENOENT from the next server", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("queued lstat still waiting after the next server answered")
	}
}

// TestRefuseConnectionEnds: Refuse returns nil when the file system is
// unmounted.
func TestRefuseConnectionEnds(t *testing.T) {
	mnt, dev := refuseTestMount(t)
	stop, done := startRefuse(dev)
	defer close(stop)
	if _, err := os.Lstat(filepath.Join(mnt, "x")); !errors.Is(err, syscall.EIO) {
		t.Errorf("lstat: %v, want EIO", err)
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-done:
		if err != nil {
			t.Errorf("Refuse after unmount: %v", err)
		}
	case <-time.After(2 * time.Second):
		t.Error("Refuse still running 2s after unmount")
	}
}

func TestRefuseNeedsReply(t *testing.T) {
	for op, want := range map[uint32]bool{
		1:  true,  // LOOKUP
		3:  true,  // GETATTR
		15: true,  // READ
		16: true,  // WRITE
		18: true,  // RELEASE
		2:  false, // FORGET
		42: false, // BATCH_FORGET
		36: false, // INTERRUPT
		41: false, // NOTIFY_REPLY
		26: false, // INIT: an error would break the connection
	} {
		if got := refuseNeedsReply(op); got != want {
			t.Errorf("refuseNeedsReply(%d) = %v, want %v", op, got, want)
		}
	}
}
