package overlay

import (
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// benchOverlay returns a fresh overlay over lower, without the lower-tree
// digest newOverlay takes (too slow for big lowers).
func benchOverlay(b *testing.B, lower *DirLower) *FS {
	l, err := memfs.New(b.TempDir()+"/upper", memfs.Options{Size: 512 << 20})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { l.Close() })
	fs, err := New(l, lower)
	if err != nil {
		b.Fatal(err)
	}
	return fs
}

// BenchmarkAppendByteToLowerFile appends one byte to a 256 MiB lower file:
// the in-process cost of copy-up (lookup, open for write, write, release).
func BenchmarkAppendByteToLowerFile(b *testing.B) {
	root := b.TempDir()
	const size = 256 << 20
	f, err := os.Create(filepath.Join(root, "f"))
	if err != nil {
		b.Fatal(err)
	}
	f.Truncate(size)
	f.Close()
	lower, _ := NewDirLower(root)
	defer lower.Close()
	var upperBytes uint64
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		fs := benchOverlay(b, lower)
		before, _ := fs.Usage()
		b.StartTimer()
		e, err := fs.Lookup(vfs.RootIno, "f")
		if err != nil {
			b.Fatal(err)
		}
		of, err := fs.Open(e.Ino(), unix.O_WRONLY, vfs.OpenOptions{})
		if err != nil {
			b.Fatal(err)
		}
		if _, err := of.WriteAt([]byte("!"), size, false); err != nil {
			b.Fatal(err)
		}
		of.Release()
		fs.Forget(e.Ino(), 1)
		b.StopTimer()
		after, _ := fs.Usage()
		upperBytes = after.BytesUsed - before.BytesUsed
		fs.Close()
		b.StartTimer()
	}
	b.ReportMetric(float64(upperBytes), "upper-bytes")
}

// BenchmarkRenameLowerDir renames a lower directory of 1000 files.
func BenchmarkRenameLowerDir(b *testing.B) {
	root := b.TempDir()
	os.Mkdir(filepath.Join(root, "d"), 0o755)
	for i := 0; i < 1000; i++ {
		os.WriteFile(filepath.Join(root, "d", fmt.Sprint(i)), []byte("x"), 0o644)
	}
	lower, _ := NewDirLower(root)
	defer lower.Close()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		fs := benchOverlay(b, lower)
		b.StartTimer()
		if err := fs.Rename(vfs.RootIno, "d", vfs.RootIno, "e", 0); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		fs.Close()
		b.StartTimer()
	}
}

// BenchmarkWalkLowerTree looks up, stats and reads every file of a lower
// tree of 5000 small files in 50 directories (find | xargs cat).
func BenchmarkWalkLowerTree(b *testing.B) {
	root := b.TempDir()
	for d := 0; d < 50; d++ {
		dir := filepath.Join(root, fmt.Sprint("d", d))
		os.Mkdir(dir, 0o755)
		for i := 0; i < 100; i++ {
			os.WriteFile(filepath.Join(dir, fmt.Sprint(i)), []byte("some bytes of a small file\n"), 0o644)
		}
	}
	lower, _ := NewDirLower(root)
	defer lower.Close()
	fs := benchOverlay(b, lower)
	defer fs.Close()
	buf := make([]byte, 4096)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		for d := 0; d < 50; d++ {
			de, err := fs.Lookup(vfs.RootIno, fmt.Sprint("d", d))
			if err != nil {
				b.Fatal(err)
			}
			dir, _ := fs.OpenDir(de.Ino())
			var names []string
			dir.ReadDir(0, func(e *vfs.DirEntry) bool {
				if e.Name != "." && e.Name != ".." {
					names = append(names, e.Name)
				}
				return true
			})
			dir.Close()
			for _, name := range names {
				e, err := fs.Lookup(de.Ino(), name)
				if err != nil {
					b.Fatal(err)
				}
				f, err := fs.Open(e.Ino(), unix.O_RDONLY, vfs.OpenOptions{})
				if err != nil {
					b.Fatal(err)
				}
				f.ReadAt(buf, 0)
				f.Release()
				fs.Forget(e.Ino(), 1)
			}
			fs.Forget(de.Ino(), 1)
		}
	}
	b.ReportMetric(float64(b.Elapsed().Nanoseconds())/float64(b.N)/5000, "ns/file")
}
