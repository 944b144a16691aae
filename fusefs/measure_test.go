package fusefs

import (
	"bufio"
	"bytes"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
)

// meminfo returns /proc/meminfo's figures in bytes.
func meminfo(t *testing.T) map[string]int64 {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	m := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		k, v, _ := strings.Cut(sc.Text(), ":")
		n, _ := strconv.ParseInt(strings.Fields(v)[0], 10, 64)
		m[k] = n << 10
	}
	return m
}

// TestMeasureVolumeMemory measures, through a real mount, how much node
// memory a 64 MiB volume takes when a pod fills it with data, with empty
// files, or with xattrs: the figures of docs/limits.md. It runs only with
// CSI_MEMFS_MEASURE=1, on a quiet machine.
func TestMeasureVolumeMemory(t *testing.T) {
	if os.Getenv("CSI_MEMFS_MEASURE") != "1" {
		t.Skip("set CSI_MEMFS_MEASURE=1 to measure")
	}
	const size = 64 << 20
	value := func(n int) []byte { return bytes.Repeat([]byte("v"), n) }
	fills := []struct {
		name   string
		inodes uint64
		fill   func(mnt string, i int) error
	}{
		{"data, 1 MiB files", 0, func(mnt string, i int) error {
			return os.WriteFile(fmt.Sprintf("%s/d%d", mnt, i), value(1<<20), 0o644)
		}},
		{"empty files", 0, func(mnt string, i int) error {
			return unix.Mknod(fmt.Sprintf("%s/e%d", mnt, i), unix.S_IFREG|0o644, 0)
		}},
		{"empty files, inodes=1500000", 1500000, func(mnt string, i int) error {
			return unix.Mknod(fmt.Sprintf("%s/e%d", mnt, i), unix.S_IFREG|0o644, 0)
		}},
		{"xattrs of 1000 B", 0, xattrFill(value(1000))},
		{"xattrs of 1000 B, inodes=1500000", 1500000, xattrFill(value(1000))},
		{"xattrs of 4000 B, inodes=1500000", 1500000, xattrFill(value(4000))},
	}
	// MemAvailable moves too much with other work to be of use.
	t.Logf("| fill | items | df used | Shmem | SUnreclaim | SReclaimable | node memory / size |")
	for _, f := range fills {
		requireFUSE(t)
		base := t.TempDir()
		os.Chmod(base, 0o755)
		l, err := memfs.New(filepath.Join(base, "upper"), memfs.Options{Size: size, Inodes: f.inodes})
		if err != nil {
			t.Fatal(err)
		}
		mnt, srv := func() (string, *Server) {
			mnt, srv := mountUnmanaged(t, base, l, Options{})
			return mnt, srv
		}()
		time.Sleep(time.Second)
		before := meminfo(t)
		n := 0
		for ; n < 10_000_000; n++ {
			if err := f.fill(mnt, n); err != nil {
				if err != unix.ENOSPC && !os.IsExist(err) && !strings.Contains(err.Error(), "no space") {
					t.Errorf("%s: %v", f.name, err)
				}
				break
			}
		}
		time.Sleep(time.Second)
		after := meminfo(t)
		var st unix.Statfs_t
		unix.Statfs(mnt, &st)
		used := int64(st.Blocks-st.Bfree) * st.Bsize
		d := func(k string) float64 { return float64(after[k]-before[k]) / (1 << 20) }
		t.Logf("| %s | %d | %.1f MiB | %.1f MiB | %.1f MiB | %.1f MiB | %.2f |", f.name, n, float64(used)/(1<<20),
			d("Shmem"), d("SUnreclaim"), d("SReclaimable"), (d("Shmem")+d("SUnreclaim")+d("SReclaimable"))/(size>>20))
		srv.Unmount()
		l.Close()
	}
}

// xattrFill sets xattrs of value, 1000 on each file.
func xattrFill(value []byte) func(mnt string, i int) error {
	return func(mnt string, i int) error {
		p := fmt.Sprintf("%s/x%d", mnt, i/1000)
		if i%1000 == 0 {
			if err := unix.Mknod(p, unix.S_IFREG|0o644, 0); err != nil {
				return err
			}
		}
		return unix.Setxattr(p, fmt.Sprintf("user.k%d", i%1000), value, 0)
	}
}
