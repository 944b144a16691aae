package fusefs

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
	"unsafe"

	"golang.org/x/sys/unix"
)

// BenchmarkRingMetadata times metadata round trips on two mounts of the
// same build, one served over io_uring and one over /dev/fuse, taking
// turns: for each round (RING_BENCH_ROUNDS, default 5), each operation
// runs on one transport, then the other. Operations:
//
//   - getattr: statx(AT_STATX_FORCE_SYNC) of a file, one GETATTR whatever
//     the attribute timeout;
//   - lookup-uncached: statx(AT_SYMLINK_NOFOLLOW) of a name whose dentry
//     the kernel dropped, one LOOKUP;
//   - create: open(O_CREAT|O_EXCL) and close of a new name;
//   - unlink: unlink of a name the kernel knows.
//
// The client makes its system calls on paths converted beforehand, so
// that it allocates nothing: allocs/op and B/op are the server's, per
// operation. Reported besides ns/op: FUSE requests per operation, FORGETs
// included (req/op), and the 1-minute load average at the end (load1).
//
// An operation that takes ringStallAfter leaves its evidence in a file
// (ringStallDump) and the benchmark goes on waiting.
func BenchmarkRingMetadata(b *testing.B) {
	requireRing(b)
	mounts := map[Transport]*Server{}
	for _, tr := range []Transport{TransportIOUring, TransportDevFuse} {
		_, _, srv := testMount(b, 256<<20, Options{Transport: tr})
		if srv.Transport() != tr {
			b.Fatalf("asked for %s, got %s", tr, srv.Transport())
		}
		mounts[tr] = srv
	}
	rounds := 5
	if n, err := strconv.Atoi(os.Getenv("RING_BENCH_ROUNDS")); err == nil && n > 0 {
		rounds = n
	}
	for round := 1; round <= rounds; round++ {
		for _, op := range []string{"getattr", "lookup-uncached", "create", "unlink"} {
			for _, tr := range []Transport{TransportIOUring, TransportDevFuse} {
				b.Run(fmt.Sprintf("%s/%s/round=%d", op, tr, round), func(b *testing.B) {
					benchRingOp(b, mounts[tr], op)
				})
			}
		}
	}
}

// requestsServed returns how many requests srv has read.
func requestsServed(srv *Server) uint64 {
	var n uint64
	for _, v := range srv.RequestCounts() {
		n += v
	}
	return n
}

func benchRingOp(b *testing.B, srv *Server, op string) {
	guard := time.AfterFunc(ringStallAfter, func() { ringStallDump(b.Name(), srv) })
	defer guard.Stop()
	dir, err := os.MkdirTemp(srv.mountpoint, op)
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	names := make([]*byte, b.N)
	for i := range names {
		if names[i], err = unix.BytePtrFromString(filepath.Join(dir, strconv.Itoa(i))); err != nil {
			b.Fatal(err)
		}
	}
	f, err := unix.BytePtrFromString(filepath.Join(dir, "f"))
	if err != nil {
		b.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "f"), nil, 0o644); err != nil {
		b.Fatal(err)
	}
	switch op {
	case "lookup-uncached", "unlink":
		for i := range names {
			fd, err := unix.Creat(filepath.Join(dir, strconv.Itoa(i)), 0o644)
			if err != nil {
				b.Fatal(err)
			}
			unix.Close(fd)
		}
		if op == "lookup-uncached" {
			dropDentries(b)
			// Let the FORGETs the eviction caused drain.
			time.Sleep(100 * time.Millisecond)
		}
	}
	var stx unix.Statx_t
	at := unix.AT_FDCWD
	reqs := requestsServed(srv)
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		var errno syscall.Errno
		switch op {
		case "getattr":
			_, _, errno = unix.Syscall6(unix.SYS_STATX, uintptr(at), uintptr(unsafe.Pointer(f)),
				unix.AT_STATX_FORCE_SYNC, unix.STATX_BASIC_STATS, uintptr(unsafe.Pointer(&stx)), 0)
		case "lookup-uncached":
			_, _, errno = unix.Syscall6(unix.SYS_STATX, uintptr(at), uintptr(unsafe.Pointer(names[i])),
				unix.AT_SYMLINK_NOFOLLOW, unix.STATX_BASIC_STATS, uintptr(unsafe.Pointer(&stx)), 0)
		case "create":
			var fd uintptr
			fd, _, errno = unix.Syscall6(unix.SYS_OPENAT, uintptr(at), uintptr(unsafe.Pointer(names[i])),
				unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o644, 0, 0)
			if errno == 0 {
				unix.Close(int(fd))
			}
		case "unlink":
			_, _, errno = unix.Syscall(unix.SYS_UNLINKAT, uintptr(at), uintptr(unsafe.Pointer(names[i])), 0)
		}
		if errno != 0 {
			b.Fatalf("%s: %v", op, errno)
		}
	}
	b.StopTimer()
	// FORGETs come a moment after the eviction that causes them.
	time.Sleep(20 * time.Millisecond)
	b.ReportMetric(float64(requestsServed(srv)-reqs)/float64(b.N), "req/op")
	b.ReportMetric(loadAvg(), "load1")
}

// ringStallAfter is how long one run of benchRingOp may take before it
// counts as stalled: a normal run takes under 2 s, at load 15 too.
const ringStallAfter = 30 * time.Second

// ringStallDump writes what a stalled benchmark shows to a file in the
// temporary directory, and says where on stderr: srv's readers and
// request counts, the kernel's requests waiting on each FUSE connection,
// the kernel stack and state of each thread of this process, and every
// goroutine. Its timer is the one this process would not otherwise have:
// a stall that only a timer or sysmon ends may end at the dump.
func ringStallDump(name string, srv *Server) {
	var b strings.Builder
	s := srv.sess
	fmt.Fprintf(&b, "%s stalled %v at %s\n%s %s: readers=%d idle=%d requests=%v\n", name, ringStallAfter,
		time.Now().Format(time.RFC3339Nano), srv.mountpoint, srv.Transport(), s.readers.Load(), s.idle.Load(), srv.RequestCounts())
	conns, _ := filepath.Glob(filepath.Join(fusectlDir, "*", "waiting"))
	for _, c := range conns {
		w, _ := os.ReadFile(c)
		fmt.Fprintf(&b, "%s: %s", c, w)
	}
	tasks, _ := filepath.Glob("/proc/self/task/*")
	for _, t := range tasks {
		stat, _ := os.ReadFile(filepath.Join(t, "stat"))
		stack, _ := os.ReadFile(filepath.Join(t, "stack"))
		fmt.Fprintf(&b, "== thread %s\n%s", strings.Join(strings.Fields(string(stat))[:3], " "), stack)
	}
	buf := make([]byte, 16<<20)
	b.Write(buf[:runtime.Stack(buf, true)])
	f, err := os.CreateTemp("", "ring-stall-*.txt")
	if err == nil {
		_, err = f.WriteString(b.String())
		f.Close()
	}
	if err != nil {
		fmt.Fprintf(os.Stderr, "%s stalled; writing the evidence failed: %v\n", name, err)
		return
	}
	fmt.Fprintf(os.Stderr, "%s stalled %v: evidence in %s\n", name, ringStallAfter, f.Name())
}
