package fusefs

import (
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	gofs "github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"

	"github.com/csi-memfs/csi-memfs/memfs"
)

// BenchmarkMetadataAPI measures the metadata path (where FUSE round trips
// dominate) of our fuse.RawFileSystem server against go-fuse's node API
// (its loopback file system) over the same kind of tmpfs, with the same
// cache timeouts and mount options. It is how the raw API was chosen; see
// BENCHMARKS.md.
func BenchmarkMetadataAPI(b *testing.B) {
	mounts := map[string]func(b *testing.B) string{
		"raw":     mountRaw,
		"nodeapi": mountNodeAPI,
	}
	for _, api := range []string{"raw", "nodeapi"} {
		mnt := mounts[api](b)
		for _, op := range []string{"create", "stat", "unlink"} {
			b.Run(api+"/"+op, func(b *testing.B) {
				dir := filepath.Join(mnt, fmt.Sprint(op, b.N))
				os.Mkdir(dir, 0o755)
				names := make([]string, b.N)
				for i := range names {
					names[i] = filepath.Join(dir, fmt.Sprint(i))
				}
				if op != "create" {
					for _, n := range names {
						fd, _ := syscall.Creat(n, 0o644)
						syscall.Close(fd)
					}
					// Evict the kernel's dentries, so that each stat
					// costs a LOOKUP round trip.
					os.WriteFile("/proc/sys/vm/drop_caches", []byte("2"), 0)
				}
				var st syscall.Stat_t
				b.ResetTimer()
				for i := 0; i < b.N; i++ {
					switch op {
					case "create":
						fd, err := syscall.Creat(names[i], 0o644)
						if err != nil {
							b.Fatal(err)
						}
						syscall.Close(fd)
					case "stat":
						// A name the kernel has not cached: a LOOKUP.
						if err := syscall.Lstat(names[i], &st); err != nil {
							b.Fatal(err)
						}
					case "unlink":
						if err := syscall.Unlink(names[i]); err != nil {
							b.Fatal(err)
						}
					}
				}
			})
		}
	}
}

func mountRaw(b *testing.B) string {
	mnt, _, _ := testMount(b, 1<<30, Options{})
	return mnt
}

func mountNodeAPI(b *testing.B) string {
	requireFUSE(b)
	base := b.TempDir()
	l, err := memfs.New(filepath.Join(base, "upper"), memfs.Options{Size: 1 << 30})
	if err != nil {
		b.Fatal(err)
	}
	root, err := gofs.NewLoopbackRoot(l.Dir())
	if err != nil {
		b.Fatal(err)
	}
	mnt := filepath.Join(base, "mnt")
	os.Mkdir(mnt, 0o755)
	timeout := time.Hour
	srv, err := gofs.Mount(mnt, root, &gofs.Options{
		EntryTimeout:    &timeout,
		AttrTimeout:     &timeout,
		NegativeTimeout: &timeout,
		MountOptions: fuse.MountOptions{
			AllowOther:         true,
			Options:            []string{"default_permissions"},
			DirectMountStrict:  true,
			DisableReadDirPlus: true,
			MaxWrite:           1 << 20,
		},
	})
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() {
		srv.Unmount()
		l.Close()
	})
	return mnt
}
