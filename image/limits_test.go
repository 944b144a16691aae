package image

import (
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// A small gzip layer that expands past the budget fails the pull as soon
// as the flattened contents pass it, and leaves nothing.
func TestPullDecompressionBomb(t *testing.T) {
	reg := newTestRegistry(t)
	zeros := strings.Repeat("\x00", 8<<20) // 8 MiB, about 8 KiB gzipped
	img := buildImage(t, "amd64", gzLayer(t, tarBytes(t, file("a", "small"), file("bomb", zeros))))
	ls, _ := img.Layers()
	if n, _ := ls[0].Size(); n > 64<<10 {
		t.Fatalf("layer is %d bytes compressed, want a small one", n)
	}
	ref := reg.push("bomb:v1", img)
	c := newTestCache(t, Config{Budget: 4 << 20})
	_, err := get(t, c, ref, PullIfNotPresent, nil)
	if !errors.Is(err, ErrTooLarge) || !errors.Is(err, ErrCacheFull) {
		t.Fatalf("err = %v, want ErrTooLarge (and ErrCacheFull)", err)
	}
	if !strings.Contains(err.Error(), "budget") {
		t.Errorf("err = %q, want it to name the budget", err)
	}
	if ResultOf(err) != ResultCacheFull {
		t.Errorf("ResultOf = %s", ResultOf(err))
	}
	t.Logf("bomb: %v", err)
	assertClean(t, c, 0)
}

// The flattener stops writing at the limit: the partial tree is never
// larger than it.
func TestFlattenLimits(t *testing.T) {
	many := make([]tarEntry, 0, 60)
	for i := range 60 {
		many = append(many, file(fmt.Sprintf("d/f%d", i), "x"))
	}
	deep := strings.Repeat("d/", 100) + "f"
	tests := []struct {
		name  string
		lim   limits
		layer []byte
		want  string
	}{
		{"bytes", limits{bytes: 1 << 20, bytesWhy: "the test"}, tarBytes(t, file("a", strings.Repeat("z", 600<<10)), file("b", strings.Repeat("z", 600<<10))), "bytes"},
		{"bytes one file", limits{bytes: 1 << 20, bytesWhy: "the test"}, tarBytes(t, file("a", strings.Repeat("z", 2<<20))), "bytes"},
		{"files", limits{files: 50}, tarBytes(t, many...), "files"},
		{"implicit dirs count", limits{files: 50}, tarBytes(t, file(deep, "x")), "files"},
		{"path", limits{pathLen: 100}, tarBytes(t, file(strings.Repeat("p", 101), "x")), "path length"},
		{"symlink target", limits{pathLen: 100}, tarBytes(t, symlink("l", strings.Repeat("t/", 60))), "path length"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			base := t.TempDir()
			root := filepath.Join(base, "rootfs")
			os.Mkdir(root, 0o755)
			f, err := newFlattener(root, tc.lim)
			if err != nil {
				t.Fatal(err)
			}
			err = f.ApplyLayer(strings.NewReader(string(tc.layer)))
			f.Close()
			if !errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("err = %v, want ErrTooLarge naming %q", err, tc.want)
			}
			size, inodes, err := treeSize(root)
			if err != nil {
				t.Fatal(err)
			}
			if tc.lim.bytes > 0 && size > tc.lim.bytes+64<<10 {
				t.Errorf("partial tree holds %d bytes, limit %d", size, tc.lim.bytes)
			}
			if tc.lim.files > 0 && inodes > tc.lim.files+1 {
				t.Errorf("partial tree holds %d inodes, limit %d", inodes, tc.lim.files)
			}
		})
	}
}

// TestFlattenNameTooLong: an entry name longer than NAME_MAX makes the
// image unusable on any node (ErrUnsafe: FailedPrecondition), not too
// large for this one.
func TestFlattenNameTooLong(t *testing.T) {
	root := filepath.Join(t.TempDir(), "rootfs")
	os.Mkdir(root, 0o755)
	f, err := newFlattener(root, limits{})
	if err != nil {
		t.Fatal(err)
	}
	err = f.ApplyLayer(strings.NewReader(string(tarBytes(t, file(strings.Repeat("n", 300), "x")))))
	f.Close()
	if !errors.Is(err, ErrUnsafe) || errors.Is(err, ErrTooLarge) || !strings.Contains(err.Error(), "file name") {
		t.Fatalf("err = %v, want ErrUnsafe naming the file name limit", err)
	}
}

// killedPullEnv names the cache directory and reference of the helper
// process TestKilledPullLeavesNothing kills mid-pull.
const killedPullEnv = "CSI_MEMFS_TEST_KILLED_PULL"

// A pull killed with SIGKILL leaves its half-made tree in tmp/; the next
// NewCache removes it.
func TestKilledPullLeavesNothing(t *testing.T) {
	if v := os.Getenv(killedPullEnv); v != "" {
		dir, ref, _ := strings.Cut(v, " ")
		c, err := NewCache(Config{Dir: dir, NoSync: true, InsecureRegistries: []string{"127.0.0.1"}})
		if err != nil {
			t.Fatal(err)
		}
		get(t, c, ref, PullIfNotPresent, nil)
		return
	}
	reg := newTestRegistry(t)
	// Two layers: the first lands at once, the second trickles, so the
	// helper is killed with a partial tree on disk.
	img := buildImage(t, "amd64",
		gzLayer(t, tarBytes(t, file("first", randString(1<<20)))),
		gzLayer(t, tarBytes(t, file("second", randString(1<<20)))))
	ref := reg.push("killed:v1", img)
	reg.mu.Lock()
	reg.slow, reg.chunk = 50*time.Millisecond, 64<<10
	reg.mu.Unlock()
	dir := t.TempDir()
	cmd := exec.Command(os.Args[0], "-test.run=^TestKilledPullLeavesNothing$", "-test.count=1")
	cmd.Env = append(os.Environ(), killedPullEnv+"="+dir+" "+ref)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer cmd.Process.Kill()
	// Wait until the first layer is on disk.
	deadline := time.Now().Add(30 * time.Second)
	for {
		m, _ := filepath.Glob(filepath.Join(dir, "tmp", "pull-*", "rootfs", "*"))
		if len(m) > 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the helper never started flattening")
		}
		time.Sleep(20 * time.Millisecond)
	}
	cmd.Process.Kill()
	cmd.Wait()
	if m, _ := filepath.Glob(filepath.Join(dir, "tmp", "pull-*")); len(m) == 0 {
		t.Fatal("the killed pull left nothing to clean: the test proves nothing")
	}
	c := newTestCache(t, Config{Dir: dir})
	assertClean(t, c, 0)
}
