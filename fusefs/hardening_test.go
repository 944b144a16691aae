package fusefs

import (
	"bufio"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/go-logr/logr/funcr"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// panicFS is a file system whose Lookup of panicName panics.
type panicFS struct{ vfs.FS }

const panicName = "panics"

func (p panicFS) Lookup(parent uint64, name string) (vfs.Entry, error) {
	if name == panicName {
		panic("test panic in Lookup")
	}
	return p.FS.Lookup(parent, name)
}

// logCapture collects what klog logs until the test ends.
type logCapture struct {
	mu    sync.Mutex
	lines []string
}

func captureLog(t *testing.T) *logCapture {
	c := &logCapture{}
	klog.SetLogger(funcr.New(func(prefix, args string) {
		c.mu.Lock()
		c.lines = append(c.lines, prefix+args)
		c.mu.Unlock()
	}, funcr.Options{}))
	t.Cleanup(klog.ClearLogger)
	return c
}

// matching returns the lines that contain s.
func (c *logCapture) matching(s string) []string {
	c.mu.Lock()
	defer c.mu.Unlock()
	var m []string
	for _, l := range c.lines {
		if strings.Contains(l, s) {
			m = append(m, l)
		}
	}
	return m
}

// TestHandlerPanic checks that a request whose handler panics is answered
// EIO, logged once with its operation, node and stack as structured
// fields, and counted, and that the server goes on serving.
func TestHandlerPanic(t *testing.T) {
	logs := captureLog(t)
	base, l := newTestLayer(t, 16<<20)
	mnt, srv := mountTest(t, base, panicFS{l}, Options{})
	var st unix.Stat_t
	if err := unix.Stat(mnt+"/"+panicName, &st); err != syscall.EIO {
		t.Errorf("stat of a name whose lookup panics: %v, want EIO", err)
	}
	if err := unix.Stat(mnt+"/other", &st); err != syscall.ENOENT {
		t.Errorf("stat after the panic: %v, want ENOENT", err)
	}
	if got := srv.Panics(); got != 1 {
		t.Errorf("Panics() = %d, want 1", got)
	}
	lines := logs.matching("test panic in Lookup")
	if len(lines) != 1 {
		t.Fatalf("%d log lines name the panic, want 1: %q", len(lines), lines)
	}
	for _, want := range []string{`"op"="LOOKUP"`, `"nodeID"=1`, `"stack"="`, "fusefs.panicFS.Lookup"} {
		if !strings.Contains(lines[0], want) {
			t.Errorf("the panic's log line lacks %s: %s", want, lines[0])
		}
	}
}

// TestUnmountWithOpenFile checks that Unmount returns soon although a
// process holds a file of the volume open: the mount leaves the namespace,
// the connection is ended after the grace period, a read from the held
// descriptor then fails (or, with passthrough, is served by the backing
// file) rather than hangs, and the memory layer closes.
func TestUnmountWithOpenFile(t *testing.T) {
	for _, c := range []struct {
		name string
		opts Options
	}{
		{"passthrough", Options{}},
		{"daemonIO", Options{DisablePassthrough: true}},
	} {
		t.Run(c.name, func(t *testing.T) {
			requireFUSE(t)
			base := t.TempDir()
			l, err := memfs.New(filepath.Join(base, "upper"), memfs.Options{Size: 16 << 20})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(func() { l.Close() }) // if the test ends early
			mnt := filepath.Join(base, "mnt")
			if err := os.Mkdir(mnt, 0o755); err != nil {
				t.Fatal(err)
			}
			opts := c.opts
			opts.UnmountGrace = 200 * time.Millisecond
			srv, err := Mount(mnt, l, opts)
			if err != nil {
				t.Fatal(err)
			}
			var st unix.Stat_t
			if err := unix.Stat(mnt, &st); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(mnt+"/f", []byte("data"), 0o644); err != nil {
				t.Fatal(err)
			}
			// The child holds f open and reads it when told.
			cmd := exec.Command(helper(t), "-test.run=^$", mnt+"/f")
			cmd.Env = append(os.Environ(), "FUSEFS_TEST_AS=hold")
			stdin, _ := cmd.StdinPipe()
			stdout, _ := cmd.StdoutPipe()
			if err := cmd.Start(); err != nil {
				t.Fatal(err)
			}
			defer cmd.Process.Kill()
			lines := make(chan string, 2)
			go func() {
				sc := bufio.NewScanner(stdout)
				for sc.Scan() {
					lines <- sc.Text()
				}
				close(lines)
			}()
			if got := <-lines; got != "held" {
				t.Fatalf("child: %q, want held", got)
			}

			done := make(chan error, 1)
			start := time.Now()
			go func() { done <- srv.Unmount() }()
			select {
			case err := <-done:
				if err != nil {
					t.Errorf("unmount: %v", err)
				}
			case <-time.After(10 * time.Second):
				// Unblock Unmount (and the test) by hand.
				os.WriteFile(fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", unix.Minor(st.Dev)), []byte("1"), 0)
				<-done
				t.Fatalf("Unmount with a file held open did not return in 10s")
			}
			t.Logf("Unmount returned after %v", time.Since(start).Round(time.Millisecond))
			if !srv.Forced() {
				t.Errorf("Forced() = false after ending a connection with a file open")
			}

			// The layer's tmpfs goes too, though the kernel may still hold
			// a passthrough backing file of it for the child.
			closed := make(chan error, 1)
			go func() { closed <- l.Close() }()
			select {
			case err := <-closed:
				if err != nil {
					t.Errorf("closing the layer: %v", err)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("closing the layer hangs while a file is held open")
			}
			mi, err := os.ReadFile("/proc/self/mountinfo")
			for _, dir := range []string{mnt, l.Dir()} {
				if err != nil || strings.Contains(string(mi), " "+dir+" ") {
					t.Errorf("%s still in mountinfo (%v)", dir, err)
				}
			}

			fmt.Fprintln(stdin)
			select {
			case got := <-lines:
				// The errno of the child's pread.
				t.Logf("a read from the held descriptor after Unmount: errno %s", got)
				switch {
				case got == "0" && srv.Passthrough():
					// The kernel reads the backing file itself, and keeps
					// it while the file is open.
				case got == "0":
					t.Errorf("a read from the held descriptor succeeded after the connection ended")
				case got != strconv.Itoa(int(syscall.ENOTCONN)) && got != strconv.Itoa(int(syscall.EIO)):
					t.Errorf("a read from the held descriptor: errno %s, want ENOTCONN or EIO", got)
				}
			case <-time.After(10 * time.Second):
				t.Fatalf("a read from the held descriptor hangs after Unmount")
			}
			cmd.Wait()
		})
	}
}
