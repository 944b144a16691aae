package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// TestConcurrentVolumes publishes 50 volumes at once (some of them twice at
// the same time), uses them, unpublishes them all at once (some twice), and
// checks that no mount, reservation, journal entry, lock, goroutine or heap
// memory is left behind.
func TestConcurrentVolumes(t *testing.T) {
	const n = 50
	env := startDriver(t, func(c *Config) {
		c.NodeBudget = n << 20
		c.DefaultVolumeSize = 1 << 20
	})
	ctx := context.Background()

	// Warm up lazily started machinery (gRPC streams, metric children,
	// FUSE server pools) before taking the baseline.
	tw := env.publish(t, "warm-up", attrs())
	os.WriteFile(filepath.Join(tw, "f"), []byte("x"), 0o644)
	scrape(t, env.metrics)
	env.unpublish(t, "warm-up", tw)
	baseGoroutines, baseHeap := settle()

	targets := make([]string, n)
	for i := range targets {
		targets[i] = env.target(t, fmt.Sprintf("vol-%02d", i))
	}
	var wg sync.WaitGroup
	errs := make(chan error, 4*n)
	for i := 0; i < n; i++ {
		callers := 1
		if i%10 == 0 {
			callers = 2 // the same publish twice at once: both succeed
		}
		for c := 0; c < callers; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("vol-%02d", i)
				if _, err := env.node.NodePublishVolume(ctx, pubReq(id, targets[i], attrs())); err != nil {
					errs <- fmt.Errorf("publish %s: %w", id, err)
					return
				}
				if err := os.WriteFile(filepath.Join(targets[i], fmt.Sprintf("f%d", c)), []byte(id), 0o644); err != nil {
					errs <- err
				}
			}()
		}
	}
	wg.Add(1)
	go func() { defer wg.Done(); scrape(t, env.metrics) }() // concurrently with the publishes
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if t.Failed() {
		return
	}
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
	if got := len(mountsUnder(t, env.root)); got != 2*n {
		t.Errorf("%d mounts, want %d (a target and a memory layer per volume)", got, 2*n)
	}
	// The budget is full: one more volume is refused, and leaves nothing.
	extra := env.target(t, "extra")
	if _, err := env.node.NodePublishVolume(ctx, pubReq("extra", extra, attrs())); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("publish past the budget: %v, want ResourceExhausted", err)
	}

	errs = make(chan error, 2*n)
	for i := 0; i < n; i++ {
		callers := 1
		if i%10 == 5 {
			callers = 2
		}
		for c := 0; c < callers; c++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				id := fmt.Sprintf("vol-%02d", i)
				if _, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: targets[i]}); err != nil {
					errs <- fmt.Errorf("unpublish %s: %w", id, err)
				}
			}()
		}
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}

	if m := mountsUnder(t, env.root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
	if entries, _ := os.ReadDir(env.d.journal.dir); len(entries) > 0 {
		t.Errorf("%d journal entries left", len(entries))
	}
	if b, v := env.d.budget.bytes.Load(), env.d.budget.volumes.Load(); b != 0 || v != 0 {
		t.Errorf("budget still reserves %d bytes for %d volumes", b, v)
	}
	env.d.vols.locksMu.Lock()
	locks := len(env.d.vols.locks)
	env.d.vols.locksMu.Unlock()
	if env.d.vols.len() != 0 || locks != 0 {
		t.Errorf("registry holds %d volumes and %d locks", env.d.vols.len(), locks)
	}
	for i, tg := range targets {
		if _, err := os.Stat(tg); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("target %d: %v, want it removed", i, err)
		}
	}
	g, heap := settleTo(baseGoroutines)
	if g > baseGoroutines {
		buf := make([]byte, 1<<20)
		t.Errorf("%d goroutines, %d before the volumes:\n%s", g, baseGoroutines, buf[:runtime.Stack(buf, true)])
	}
	if heap > baseHeap+8<<20 {
		t.Errorf("heap %d bytes, %d before the volumes", heap, baseHeap)
	}
}

// settle collects garbage and returns the goroutine count and live heap.
// Two collections: sync.Pool contents survive the first.
func settle() (goroutines int, heap uint64) {
	runtime.GC()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	return runtime.NumGoroutine(), ms.HeapAlloc
}

// settleTo waits (up to 5 s) for the goroutine count to fall to want.
func settleTo(want int) (int, uint64) {
	deadline := time.Now().Add(5 * time.Second)
	for {
		g, h := settle()
		if g <= want || time.Now().After(deadline) {
			return g, h
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// TestRestart kills a serve process (SIGKILL) with volumes published,
// starts a new one on the same state directory, and checks that it reports
// the volumes as lost and unpublishes them all, leaving no mount.
func TestRestart(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	ctx := context.Background()
	p := startServe(t, root)
	conn := dial(t, p.endpoint)
	node := csi.NewNodeClient(conn)

	const n = 4
	targets := make([]string, n)
	for i := range targets {
		os.MkdirAll(filepath.Join(root, "pods", fmt.Sprint(i)), 0o755)
		targets[i] = filepath.Join(root, "pods", fmt.Sprint(i), "mount")
		id := fmt.Sprintf("vol-%d", i)
		if _, err := node.NodePublishVolume(ctx, pubReq(id, targets[i], attrs("size", "4Mi"))); err != nil {
			t.Fatalf("publish %s: %v", id, err)
		}
		if err := os.WriteFile(filepath.Join(targets[i], "data"), []byte(id), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	conn.Close()

	if err := p.cmd.Process.Kill(); err != nil {
		t.Fatal(err)
	}
	p.cmd.Wait()
	if _, err := os.Stat(filepath.Join(targets[0], "data")); !errors.Is(err, syscall.ENOTCONN) {
		t.Errorf("a volume of the killed process: %v, want ENOTCONN", err)
	}

	p2 := startServe(t, root)
	conn = dial(t, p2.endpoint)
	defer conn.Close()
	node = csi.NewNodeClient(conn)

	probe, err := csi.NewIdentityClient(conn).Probe(ctx, &csi.ProbeRequest{})
	if err != nil || !probe.GetReady().GetValue() {
		t.Errorf("Probe after restart = %v, %v", probe, err)
	}
	_, err = node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: "vol-0", VolumePath: targets[0]})
	if status.Code(err) != codes.FailedPrecondition {
		t.Errorf("stats of a lost volume: %v, want FailedPrecondition", err)
	}
	text := scrape(t, "http://"+p2.metrics)
	if v, _ := metricValue(text, `csi_memfs_node_volumes{state="lost"}`); v != n {
		t.Errorf("lost volumes = %v, want %d", v, n)
	}
	if v, _ := metricValue(text, "csi_memfs_node_reserved_bytes"); v != n*4<<20 {
		t.Errorf("reserved = %v, want %d (the lost volumes' memory layers are still mounted)", v, n*4<<20)
	}
	if v, _ := metricValue(text, "csi_memfs_volume_used_bytes", `volume_id="vol-0"`); v <= 0 {
		t.Errorf("vol-0 bytes used = %v, want its data counted", v)
	}

	// kubelet retrying a publish of a lost volume gets a fresh one.
	if _, err := node.NodePublishVolume(ctx, pubReq("vol-3", targets[3], attrs("size", "4Mi"))); err != nil {
		t.Errorf("publish a lost volume again: %v", err)
	} else if err := os.WriteFile(filepath.Join(targets[3], "data"), []byte("new"), 0o644); err != nil {
		t.Errorf("write into the republished volume: %v", err)
	}

	for i := 0; i < n; i++ {
		for try := 0; try < 2; try++ { // the second time finds nothing to do
			id := fmt.Sprintf("vol-%d", i)
			if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: targets[i]}); err != nil {
				t.Errorf("unpublish %s (try %d): %v", id, try, err)
			}
		}
		if _, err := os.Stat(targets[i]); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("target %d: %v, want it removed", i, err)
		}
	}
	if m := mountsUnder(t, root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if entries, _ := os.ReadDir(filepath.Join(root, "state", "volumes")); len(entries) > 0 {
		t.Errorf("%d journal entries left", len(entries))
	}
	text = scrape(t, "http://"+p2.metrics)
	if v, _ := metricValue(text, "csi_memfs_node_reserved_bytes"); v != 0 {
		t.Errorf("reserved after unpublishing = %v", v)
	}
}
