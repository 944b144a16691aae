package fusefs

import (
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/internal/treetest"
	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
)

// TestBigLowerDirRemove times `rm -rf` of a lower directory of
// CSI_MEMFS_BIG_DIR entries (200000 for issue 12's figure) through a real
// overlay mount, as bench/bigdir.sh does with the binary, and logs the
// FUSE requests per entry; with -cpuprofile it is the daemon's profile.
// A measurement, not a check of speed: it logs the rate against issue
// 12's target. Slow: set the variable to run it.
func TestBigLowerDirRemove(t *testing.T) {
	n, _ := strconv.Atoi(os.Getenv("CSI_MEMFS_BIG_DIR"))
	if n == 0 {
		t.Skip("set CSI_MEMFS_BIG_DIR=N to time rm -rf of N lower entries")
	}
	requireFUSE(t)
	lower := treetest.BigLower(t, n, 0)
	base := t.TempDir()
	os.Chmod(base, 0o755)
	l, err := memfs.New(filepath.Join(base, "upper"), memfs.Options{Size: 1 << 30, Inodes: uint64(2*n + 1024)})
	if err != nil {
		t.Fatal(err)
	}
	closeAtCleanup(t, l, " after unmount")
	dl, err := overlay.NewDirLower(lower)
	if err != nil {
		t.Fatal(err)
	}
	fs, err := overlay.New(l, dl)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := fs.CheckInvariants(); err != nil {
			t.Errorf("invariants after unmount: %v", err)
		}
		fs.Close()
		dl.Close()
	})
	mnt, srv := mountTest(t, base, fs, Options{})
	before := srv.RequestCounts()
	stopCount := countSyscalls(t)
	var ru0, ru1 unix.Rusage
	unix.Getrusage(unix.RUSAGE_SELF, &ru0)
	start := time.Now()
	if out, err := exec.Command("rm", "-rf", filepath.Join(mnt, "big")).CombinedOutput(); err != nil {
		t.Fatalf("rm -rf: %v\n%s", err, out)
	}
	took := time.Since(start)
	unix.Getrusage(unix.RUSAGE_SELF, &ru1)
	cpu := time.Duration(ru1.Utime.Nano() + ru1.Stime.Nano() - ru0.Utime.Nano() - ru0.Stime.Nano())
	if calls := stopCount(); calls >= 0 {
		t.Logf("server: %.1f syscalls per entry", float64(calls)/float64(n))
	}
	t.Logf("server CPU: %.1f us per entry", float64(cpu.Microseconds())/float64(n))
	got := map[string]uint64{}
	for op, v := range srv.RequestCounts() {
		if v > before[op] {
			got[op] = v - before[op]
		}
	}
	rate := float64(n) / took.Seconds()
	t.Logf("rm -rf of %d lower entries: %v, %.0f entries/s; %.2f requests per entry: %s",
		n, took.Round(time.Millisecond), rate, float64(total(got))/float64(n), fmtCounts(got))
	if _, err := os.Lstat(filepath.Join(mnt, "big")); !os.IsNotExist(err) {
		t.Errorf("big after rm -rf: %v", err)
	}
	t.Logf("target >= 20000 entries/s met: %v", rate >= 20000)
}

// countSyscalls counts this process's system calls with perf until the
// returned function is called, which returns the count, or -1 when perf
// is missing or fails.
func countSyscalls(t testing.TB) func() int64 {
	out := filepath.Join(t.TempDir(), "perf")
	cmd := exec.Command("perf", "stat", "-x,", "-o", out, "-e", "raw_syscalls:sys_enter", "-p", strconv.Itoa(os.Getpid()))
	if err := cmd.Start(); err != nil {
		return func() int64 { return -1 }
	}
	time.Sleep(500 * time.Millisecond) // perf attaches
	return func() int64 {
		cmd.Process.Signal(os.Interrupt)
		cmd.Wait()
		b, err := os.ReadFile(out)
		if err != nil {
			return -1
		}
		for _, line := range strings.Split(string(b), "\n") {
			if f := strings.Split(line, ","); len(f) > 2 && strings.Contains(line, "sys_enter") {
				if v, err := strconv.ParseInt(f[0], 10, 64); err == nil {
					return v
				}
			}
		}
		return -1
	}
}
