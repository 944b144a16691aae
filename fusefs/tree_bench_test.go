package fusefs

import (
	"fmt"
	"math/rand"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
	"time"
)

// BenchmarkLowerTreeCat times `find | xargs cat` of a 5000-file lower
// tree (126 directories, 1-32 KiB files) through an overlay mount, cold
// (fresh mount) and warm, with passthrough (read-write and read-only)
// and NoOpen (files opened without OPEN, pages cached by FUSE), and
// reports the requests per file of each, the passthrough registrations
// (BACKING_OPEN and _CLOSE ioctls) per file, and the server's system calls
// per file warm (when perf can count them).
func BenchmarkLowerTreeCat(b *testing.B) {
	requireFUSE(b)
	lower := b.TempDir()
	rng := rand.New(rand.NewSource(1))
	for d := range 125 {
		dir := filepath.Join(lower, fmt.Sprintf("d%03d", d))
		os.Mkdir(dir, 0o755)
		for f := range 40 {
			data := make([]byte, 1024+rng.Intn(31<<10))
			if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("f%02d", f)), data, 0o644); err != nil {
				b.Fatal(err)
			}
		}
	}
	cat := "find . -type f -print0 | xargs -0 cat >/dev/null"
	for _, v := range []struct {
		name string
		opts Options
	}{{"passthrough", Options{}}, {"read-only", Options{ReadOnly: true}}, {"no-open", Options{ReadOnly: true, NoOpen: true}}} {
		b.Run(v.name, func(b *testing.B) {
			var cold, warm time.Duration
			var coldReqs, warmReqs, coldIoctls, warmIoctls uint64
			var warmCalls int64
			ioctls := func(srv *Server) uint64 { return srv.sess.backingOpens.Load() + srv.sess.backingCloses.Load() }
			for range b.N {
				mnt, srv := testOverlayMountServer(b, lower, v.opts)
				for i, w := range []struct {
					d      *time.Duration
					n, ioc *uint64
				}{{&cold, &coldReqs, &coldIoctls}, {&warm, &warmReqs, &warmIoctls}} {
					before, iocs := total(srv.RequestCounts()), ioctls(srv)
					stop := func() int64 { return 0 }
					if i == 1 {
						stop = countSyscalls(b)
					}
					start := time.Now()
					c := exec.Command("sh", "-c", cat)
					c.Dir = mnt
					if out, err := c.CombinedOutput(); err != nil {
						b.Fatalf("%v: %s", err, out)
					}
					*w.d += time.Since(start)
					if calls := stop(); calls < 0 || warmCalls < 0 {
						warmCalls = -1
					} else {
						warmCalls += calls
					}
					*w.n += total(srv.RequestCounts()) - before
					*w.ioc += ioctls(srv) - iocs
				}
			}
			b.ReportMetric(float64(coldIoctls)/float64(b.N)/5000, "cold-ioctl/file")
			b.ReportMetric(float64(warmIoctls)/float64(b.N)/5000, "warm-ioctl/file")
			if warmCalls >= 0 {
				b.ReportMetric(float64(warmCalls)/float64(b.N)/5000, "warm-syscalls/file")
			}
			b.ReportMetric(float64(cold.Milliseconds())/float64(b.N), "cold-ms")
			b.ReportMetric(float64(warm.Milliseconds())/float64(b.N), "warm-ms")
			b.ReportMetric(float64(coldReqs)/float64(b.N)/5000, "cold-req/file")
			b.ReportMetric(float64(warmReqs)/float64(b.N)/5000, "warm-req/file")
			b.ReportMetric(0, "ns/op")
		})
	}
}
