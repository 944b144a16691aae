package main

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/handoff"
)

func TestHoldFlags(t *testing.T) {
	f, err := parseHoldFlags(nil, io.Discard)
	if err != nil || f.deadline != 2*time.Minute {
		t.Errorf("defaults: %+v, %v", f, err)
	}
	t.Setenv("NODE_NAME", "n")
	if cfg, _ := parseServeFlags(nil, io.Discard); f.stateDir != cfg.StateDir {
		t.Errorf("hold's --state-dir default %q, serve's %q: the plugin would not find the holder", f.stateDir, cfg.StateDir)
	}
	f, err = parseHoldFlags([]string{"--state-dir", "/s", "--deadline", "30s", "-v", "2"}, io.Discard)
	if err != nil || f.stateDir != "/s" || f.deadline != 30*time.Second {
		t.Errorf("flags: %+v, %v", f, err)
	}
	for _, args := range [][]string{{"extra"}, {"--deadline", "-1s"}, {"--deadline", "soon"}} {
		if _, err := parseHoldFlags(args, io.Discard); err == nil {
			t.Errorf("%q: no error", args)
		}
	}
}

// startHold runs `csi-memfs hold` on state and waits until it answers.
// Cleanup kills it if it is still running.
func startHold(t *testing.T, bin, state string, extra ...string) (*exec.Cmd, *bytes.Buffer) {
	t.Helper()
	var stderr bytes.Buffer
	cmd := exec.Command(bin, append([]string{"hold", "--state-dir", state}, extra...)...)
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if cmd.ProcessState == nil {
			cmd.Process.Kill()
			cmd.Wait()
		}
	})
	sock := filepath.Join(state, holderSocket)
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		cl, err := handoff.Dial(sock)
		if err == nil {
			_, err = cl.List()
			cl.Close()
			if err != nil {
				t.Fatalf("List: %v", err)
			}
			return cmd, &stderr
		}
		if time.Since(start) > 10*time.Second {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("the holder does not answer: %v; stderr %q", err, stderr.String())
		}
	}
}

// TestHoldCommand runs the built command.
func TestHoldCommand(t *testing.T) {
	bin := filepath.Join(t.TempDir(), "csi-memfs")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	t.Run("usage", func(t *testing.T) {
		var stderr bytes.Buffer
		cmd := exec.Command(bin, "hold", "--deadline", "-1s")
		cmd.Stderr = &stderr
		var exit *exec.ExitError
		if err := cmd.Run(); !errors.As(err, &exit) || exit.ExitCode() != 2 || strings.Count(stderr.String(), "\n") != 1 {
			t.Errorf("bad flag: %v, stderr %q; want exit 2 and one line", err, stderr.String())
		}
	})
	t.Run("pipe", func(t *testing.T) { testHoldPipe(t, bin) })
	t.Run("crash", func(t *testing.T) { testHoldCrash(t, bin) })
}

// testHoldPipe: a descriptor put into the holder comes back from List
// and still works; SIGTERM ends the holder, which says what it held.
func testHoldPipe(t *testing.T, bin string) {
	state := t.TempDir()
	cmd, stderr := startHold(t, bin, state, "-v", "2")
	cl, err := handoff.Dial(filepath.Join(state, holderSocket))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	defer r.Close()
	if err := cl.Put(handoff.Bundle{ID: "vol-1", Meta: []byte("recorded INIT"), Files: []*os.File{w}}); err != nil {
		t.Fatal(err)
	}
	w.Close() // only the holder has the write end now
	bs, err := cl.List()
	if err != nil || len(bs) != 1 || bs[0].ID != "vol-1" || string(bs[0].Meta) != "recorded INIT" || len(bs[0].Files) != 1 {
		t.Fatalf("List: %+v, %v", bs, err)
	}
	if _, err := bs[0].Files[0].Write([]byte("through the holder")); err != nil {
		t.Fatal(err)
	}
	bs[0].Close()
	buf := make([]byte, 64)
	r.SetReadDeadline(time.Now().Add(5 * time.Second))
	if n, err := r.Read(buf); string(buf[:n]) != "through the holder" {
		t.Errorf("read from the original pipe: %q, %v", buf[:n], err)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v; stderr %q", err, stderr.String())
	}
	if !strings.Contains(stderr.String(), "bundles=1") {
		t.Errorf("the holder did not say it held one bundle; stderr %q", stderr.String())
	}
	// The holder's copy of the write end went with it.
	if n, err := r.Read(buf); err != io.EOF {
		t.Errorf("read after the holder exited: %d bytes, %v; want EOF", n, err)
	}
}

// testHoldCrash: a FUSE server (csi-memfs mount) dies with SIGKILL while
// the holder has a copy of its connection. The mount stays; once no
// plugin has been connected for the deadline, requests fail with EIO;
// when a plugin connects again, requests wait for it.
func testHoldCrash(t *testing.T, bin string) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	if _, err := os.Stat("/dev/fuse"); err != nil {
		t.Skip("needs /dev/fuse")
	}
	const deadline = 500 * time.Millisecond
	state := t.TempDir()
	holder, holderErr := startHold(t, bin, state, "--deadline", deadline.String())
	sock := filepath.Join(state, holderSocket)

	mnt, mstate := t.TempDir(), t.TempDir()
	var srvErr lockedBuffer
	srv := exec.Command(bin, "mount", "--size", "8Mi", "--state-dir", mstate,
		"--fuse-transport", "dev-fuse", mnt) // as the plugin serves: a ring-served connection cannot be held
	srv.Stderr = &srvErr
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	// Whatever happens, leave no process and no mount behind; killing the
	// holder ends the connection, and so any request still waiting.
	t.Cleanup(func() {
		srv.Process.Kill()
		holder.Process.Kill()
		for _, dir := range []string{mnt, mstate} {
			exec.Command("umount", "-R", "-l", dir).Run()
		}
		filepath.Walk(mstate, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() && fi.Name() == "upper" {
				exec.Command("umount", "-l", p).Run()
			}
			return nil
		})
	})
	// Wait for the server to say it serves: Mount has returned, so the
	// server no longer has a request of its own on the mount (a FLUSH
	// sent as it closes its probe file cannot be interrupted: killed with
	// one pending, the server could not exit until the holder answers).
	for start := time.Now(); !strings.Contains(srvErr.String(), "csi-memfs: serving"); time.Sleep(10 * time.Millisecond) {
		if time.Since(start) > 10*time.Second {
			srv.Process.Kill()
			srv.Wait()
			t.Fatalf("not serving; stderr %q", srvErr.String())
		}
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("data"), 0o644); err != nil {
		t.Fatal(err)
	}

	// What the plugin will do at publish: give the holder the device.
	// Here the test takes it from the server with pidfd_getfd.
	cl, err := handoff.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	dev := fuseDescriptorOf(t, srv.Process.Pid)
	if err := cl.Put(handoff.Bundle{ID: "vol", Meta: []byte("init"), Files: []*os.File{dev}}); err != nil {
		t.Fatal(err)
	}
	dev.Close()
	srv.Process.Kill()
	srv.Wait()
	if !mounted(mnt) {
		t.Fatal("the mount went with its server although the holder has the connection")
	}

	// The plugin is gone for longer than the deadline: callers get EIO,
	// the first one once the deadline has passed.
	left := time.Now()
	cl.Close()
	errs := make(chan error, 1)
	go func() {
		var st unix.Statfs_t
		errs <- unix.Statfs(mnt, &st)
	}()
	select {
	case err := <-errs:
		if err != unix.EIO {
			t.Errorf("statfs with no plugin: %v, want EIO", err)
		}
		if d := time.Since(left); d < deadline*9/10 {
			t.Errorf("statfs failed %v after the plugin left, before the deadline %v", d, deadline)
		}
	case <-time.After(deadline + 10*time.Second):
		t.Fatalf("statfs still waiting %v after the deadline", 10*time.Second)
	}
	start := time.Now()
	if _, err := os.Lstat(filepath.Join(mnt, "new")); !errors.Is(err, syscall.EIO) {
		t.Errorf("lstat with no plugin: %v, want EIO", err)
	}
	if d := time.Since(start); d > 2*time.Second {
		t.Errorf("lstat took %v", d)
	}

	// A plugin comes back: it gets the connection, and requests wait for
	// it again.
	cl, err = handoff.Dial(sock)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	bs, err := cl.List()
	if err != nil || len(bs) != 1 || len(bs[0].Files) != 1 {
		t.Fatalf("List: %+v, %v", bs, err)
	}
	defer bs[0].Close()
	go func() {
		var st unix.Statfs_t
		errs <- unix.Statfs(mnt, &st)
	}()
	select {
	case err := <-errs:
		t.Fatalf("statfs returned (%v) while the plugin that came back had not answered", err)
	case <-time.After(300 * time.Millisecond):
	}
	// The test is the plugin: it answers, EPERM to tell its answer apart.
	answerRequests(t, bs[0].Files[0], 17) // STATFS
	select {
	case err := <-errs:
		if err != unix.EPERM {
			t.Errorf("statfs: %v, want the plugin's EPERM", err)
		}
	case <-time.After(5 * time.Second):
		t.Error("statfs still waiting after the plugin answered")
	}
	if err := unix.Unmount(mnt, 0); err != nil {
		t.Errorf("unmount: %v", err)
	}
	holder.Process.Signal(syscall.SIGTERM)
	if err := holder.Wait(); err != nil {
		t.Errorf("holder exit: %v; stderr %q", err, holderErr.String())
	}
	// Our statfs and lstat, and perhaps the RELEASE of f's close: the
	// kernel sends it without waiting, so it may still have been queued
	// when the server was killed.
	if m := regexp.MustCompile(`refused=(\d+)`).FindStringSubmatch(holderErr.String()); m == nil || m[1] != "2" && m[1] != "3" {
		t.Errorf("the holder did not count 2 (or 3) refused requests; stderr %q", holderErr.String())
	}
}

// fuseDescriptorOf returns a copy of process pid's /dev/fuse descriptor.
func fuseDescriptorOf(t *testing.T, pid int) *os.File {
	t.Helper()
	dir := fmt.Sprintf("/proc/%d/fd", pid)
	ents, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	for _, e := range ents {
		if link, _ := os.Readlink(filepath.Join(dir, e.Name())); link != "/dev/fuse" {
			continue
		}
		target, _ := strconv.Atoi(e.Name())
		pidfd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			t.Fatal(err)
		}
		defer unix.Close(pidfd)
		fd, err := unix.PidfdGetfd(pidfd, target, 0)
		if err != nil {
			t.Fatalf("pidfd_getfd: %v", err)
		}
		return os.NewFile(uintptr(fd), "/dev/fuse")
	}
	t.Fatalf("process %d has no /dev/fuse descriptor", pid)
	return nil
}

// answerRequests answers requests on dev with EPERM until it has answered
// one of opcode op.
func answerRequests(t *testing.T, dev *os.File, op uint32) {
	t.Helper()
	buf := make([]byte, 1<<20+4<<10)
	dev.SetReadDeadline(time.Now().Add(5 * time.Second))
	for {
		n, err := dev.Read(buf)
		if errors.Is(err, syscall.EAGAIN) || errors.Is(err, syscall.ENOENT) {
			continue
		}
		if err != nil || n < 40 {
			t.Fatalf("reading a request: %d bytes, %v", n, err)
		}
		got := uint32(buf[4]) | uint32(buf[5])<<8 | uint32(buf[6])<<16 | uint32(buf[7])<<24
		if got == 2 || got == 42 || got == 36 { // FORGET, BATCH_FORGET, INTERRUPT
			continue
		}
		reply := make([]byte, 16)
		reply[0] = 16
		copy(reply[4:], []byte{0xff, 0xff, 0xff, 0xff}) // -EPERM
		copy(reply[8:], buf[8:16])
		if _, err := dev.Write(reply); err != nil {
			t.Fatalf("replying: %v", err)
		}
		if got == op {
			return
		}
	}
}

// lockedBuffer is a bytes.Buffer a process may write while the test reads.
type lockedBuffer struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (l *lockedBuffer) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.Write(p)
}

func (l *lockedBuffer) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.b.String()
}
