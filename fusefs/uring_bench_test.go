package fusefs

import (
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// BenchmarkRingMetadata times metadata round trips on two mounts of the
// same build, one served over io_uring and one over /dev/fuse, taking
// turns: for each round (RING_BENCH_ROUNDS, default 5), each operation
// runs on one transport, then the other. Operations:
//
//   - getattr: statx(AT_STATX_FORCE_SYNC) of a file, one GETATTR whatever
//     the attribute timeout;
//   - lookup-uncached: lstat of a name whose dentry the kernel dropped,
//     one LOOKUP;
//   - create: open(O_CREAT|O_EXCL) and close of a new name;
//   - unlink: unlink of a name the kernel knows.
//
// Reported: ns/op and the 1-minute load average at the end (load1).
func BenchmarkRingMetadata(b *testing.B) {
	requireRing(b)
	mounts := map[Transport]string{}
	for _, tr := range []Transport{TransportIOUring, TransportDevFuse} {
		mnt, _, srv := testMount(b, 256<<20, Options{Transport: tr})
		if srv.Transport() != tr {
			b.Fatalf("asked for %s, got %s", tr, srv.Transport())
		}
		mounts[tr] = mnt
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

func benchRingOp(b *testing.B, mnt, op string) {
	dir, err := os.MkdirTemp(mnt, op)
	if err != nil {
		b.Fatal(err)
	}
	defer os.RemoveAll(dir)
	names := make([]string, b.N)
	for i := range names {
		names[i] = filepath.Join(dir, strconv.Itoa(i))
	}
	f := filepath.Join(dir, "f")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		b.Fatal(err)
	}
	switch op {
	case "lookup-uncached", "unlink":
		for _, n := range names {
			fd, err := unix.Creat(n, 0o644)
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
	var (
		st  unix.Stat_t
		stx unix.Statx_t
	)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		switch op {
		case "getattr":
			err = unix.Statx(unix.AT_FDCWD, f, unix.AT_STATX_FORCE_SYNC, unix.STATX_BASIC_STATS, &stx)
		case "lookup-uncached":
			err = unix.Lstat(names[i], &st)
		case "create":
			var fd int
			if fd, err = unix.Open(names[i], unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o644); err == nil {
				unix.Close(fd)
			}
		case "unlink":
			err = unix.Unlink(names[i])
		}
		if err != nil {
			b.Fatal(err)
		}
	}
	b.StopTimer()
	b.ReportMetric(loadAvg(), "load1")
}
