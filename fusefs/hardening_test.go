package fusefs

import (
	"strings"
	"sync"
	"syscall"
	"testing"

	"github.com/go-logr/logr/funcr"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

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
