package fusefs

import (
	"os"
	"path/filepath"
	"testing"
)

// BenchmarkWriterAttrs counts the requests of three workloads on a
// passthrough volume (BENCHMARKS.md, "Passthrough writers and attribute
// timeouts"): one held writer that writes 4 KiB, fstats and stats by path;
// open, write 4 KiB, close and stat; open, read, close and stat of a file
// nobody writes.
func BenchmarkWriterAttrs(b *testing.B) {
	for _, wl := range []string{"held-writer", "open-write-close", "read-only"} {
		b.Run(wl, func(b *testing.B) {
			c := &opCounter{ops: map[string]int{}}
			mnt, _, _ := testMount(b, 256<<20, Options{Observer: c})
			p := filepath.Join(mnt, "f")
			buf := make([]byte, 4096)
			if err := os.WriteFile(p, buf, 0o644); err != nil {
				b.Fatal(err)
			}
			var w *os.File
			if wl == "held-writer" {
				var err error
				if w, err = os.OpenFile(p, os.O_WRONLY, 0); err != nil {
					b.Fatal(err)
				}
				defer w.Close()
			}
			os.Stat(p)
			before := c.snapshot()
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				switch wl {
				case "held-writer":
					w.WriteAt(buf, int64(i%1024)*4096)
					w.Stat()
				case "open-write-close":
					f, _ := os.OpenFile(p, os.O_WRONLY, 0)
					f.WriteAt(buf, int64(i%1024)*4096)
					f.Close()
				case "read-only":
					f, _ := os.Open(p)
					f.Read(buf)
					f.Close()
				}
				os.Stat(p)
			}
			b.StopTimer()
			after := c.snapshot()
			var total int
			for op, n := range after {
				total += n - before[op]
			}
			b.ReportMetric(float64(total)/float64(b.N), "requests/op")
			b.ReportMetric(float64(after["GETATTR"]-before["GETATTR"])/float64(b.N), "GETATTR/op")
		})
	}
}

// snapshot returns the counts so far.
func (c *opCounter) snapshot() map[string]int {
	c.mu.Lock()
	defer c.mu.Unlock()
	m := make(map[string]int, len(c.ops))
	for op, n := range c.ops {
		m[op] = n
	}
	return m
}
