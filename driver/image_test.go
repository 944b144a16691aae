package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// cachedTree returns the root of the one image tree in env's cache.
func (env *testEnv) cachedTrees(t testing.TB) []string {
	t.Helper()
	m, err := filepath.Glob(filepath.Join(env.cfg.StateDir, "images", "images", "sha256-*", "rootfs"))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// publishErr publishes volume id with secrets and returns the error.
func (env *testEnv) publishErr(t testing.TB, id string, a, secrets map[string]string) (string, error) {
	t.Helper()
	target := env.target(t, id)
	req := pubReq(id, target, a)
	req.Secrets = secrets
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	_, err := env.node.NodePublishVolume(ctx, req)
	return target, err
}

// assertClean checks that nothing of a failed or finished publish is left:
// no mount under env.root, no journal entry, no pinned image, and the
// driver's invariants hold.
func (env *testEnv) assertClean(t testing.TB) {
	t.Helper()
	env.waitIdle(t)
	if m := mountsUnder(t, filepath.Join(env.root, "pods")); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if entries, _ := os.ReadDir(env.d.journal.dir); len(entries) > 0 {
		t.Errorf("%d journal entries left", len(entries))
	}
	if st := env.d.images.Stats(); st.Pinned != 0 {
		t.Errorf("%d images still pinned", st.Pinned)
	}
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
}

// waitIdle waits until no operation holds a volume lock: a handler whose
// client gave up (DeadlineExceeded) may still be unwinding.
func (env *testEnv) waitIdle(t testing.TB) {
	t.Helper()
	for deadline := time.Now().Add(10 * time.Second); time.Now().Before(deadline); time.Sleep(10 * time.Millisecond) {
		env.d.vols.locksMu.Lock()
		n := len(env.d.vols.locks)
		env.d.vols.locksMu.Unlock()
		if n == 0 {
			return
		}
	}
	t.Errorf("volume locks still held after 10 s")
}

func readString(t testing.TB, p string) string {
	t.Helper()
	b, err := os.ReadFile(p)
	if err != nil {
		t.Errorf("read %s: %v", p, err)
	}
	return string(b)
}

// TestImageVolume publishes volumes of a layered image through the socket
// and checks the tree through the target mount, writes staying in the
// volume's memory, the seal and imagePath attributes, and the metrics.
func TestImageVolume(t *testing.T) {
	reg := newTestRegistry(t)
	const big = 256 << 10
	ref := reg.push("app:v1", layeredImage(t, big))
	env := startDriver(t, nil)

	t1 := env.publish(t, "img-1", attrs("image", ref, "size", "16Mi"))
	for p, want := range map[string]string{
		"etc/app.conf": "conf=1\n", "etc/new.conf": "new\n", "etc/link": "conf=1\n", "data/keep": "keep",
		"data/old/b": "b", "bin/tool": "tool-v2", "bin/tool-link": "tool-v2",
	} {
		if got := readString(t, filepath.Join(t1, p)); got != want {
			t.Errorf("%s = %q, want %q", p, got, want)
		}
	}
	for _, p := range []string{"gone", "data/old/a", ".wh.gone", "data/old/.wh..wh..opq"} {
		if _, err := os.Lstat(filepath.Join(t1, p)); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("%s: %v, want it absent (whiteout, opaque directory)", p, err)
		}
	}
	if l, err := os.Readlink(filepath.Join(t1, "etc/link")); err != nil || l != "app.conf" {
		t.Errorf("etc/link -> %q, %v", l, err)
	}
	var st1, st2 unix.Stat_t
	unix.Lstat(filepath.Join(t1, "bin/tool"), &st1)
	unix.Lstat(filepath.Join(t1, "bin/tool-link"), &st2)
	if st1.Ino != st2.Ino || st1.Nlink != 2 || st1.Mode&0o777 != 0o755 {
		t.Errorf("hard link: inodes %d, %d, nlink %d, mode %o; want one inode, 2 links, 0755", st1.Ino, st2.Ino, st1.Nlink, st1.Mode)
	}
	if entries, err := os.ReadDir(filepath.Join(t1, "data/old")); err != nil || len(entries) != 1 {
		t.Errorf("data/old (opaque) holds %v, %v; want only b", entries, err)
	}

	// Writes go to the volume's memory: new files, a small image file
	// rewritten, a page of a big one.
	if err := os.WriteFile(filepath.Join(t1, "scratch"), bytes.Repeat([]byte("s"), 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(t1, "etc/motd"), []byte("changed\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	f, err := os.OpenFile(filepath.Join(t1, "share/big"), os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte("XYZ"), 100_000); err != nil {
		t.Fatal(err)
	}
	f.Close()
	if err := os.Remove(filepath.Join(t1, "etc/other.conf")); err != nil {
		t.Fatal(err)
	}
	b := readString(t, filepath.Join(t1, "share/big"))
	if len(b) != big || b[100_000:100_003] != "XYZ" || b[:16] != "0123456789abcdef" || b[big-16:] != "0123456789abcdef" {
		t.Errorf("share/big after a partial write: len %d", len(b))
	}

	// The cache and a second volume of the image see none of it.
	trees := env.cachedTrees(t)
	if len(trees) != 1 {
		t.Fatalf("cache holds %d trees, want 1", len(trees))
	}
	if got := readString(t, filepath.Join(trees[0], "etc/motd")); got != "hello\n" {
		t.Errorf("cached etc/motd = %q: a volume's write reached the cache", got)
	}
	if _, err := os.Stat(filepath.Join(trees[0], "scratch")); err == nil {
		t.Errorf("a volume's new file is in the cache")
	}
	t2 := env.publish(t, "img-2", attrs("image", ref, "size", "16Mi"))
	if got := readString(t, filepath.Join(t2, "etc/motd")); got != "hello\n" {
		t.Errorf("second volume etc/motd = %q", got)
	}
	if _, err := os.Stat(filepath.Join(t2, "etc/other.conf")); err != nil {
		t.Errorf("second volume etc/other.conf: %v", err)
	}
	if _, err := os.Stat(filepath.Join(t2, "scratch")); err == nil {
		t.Errorf("the first volume's file shows in the second")
	}

	// seal: matching image files refuse writes; others do not.
	t3 := env.publish(t, "img-seal", attrs("image", ref, "seal", "etc/*.conf,bin/tool"))
	for _, p := range []string{"etc/app.conf", "etc/new.conf", "bin/tool", "bin/tool-link"} {
		if _, err := os.OpenFile(filepath.Join(t3, p), os.O_WRONLY|os.O_APPEND, 0); !errors.Is(err, syscall.EPERM) {
			t.Errorf("write open of sealed %s: %v, want EPERM", p, err)
		}
	}
	if err := os.Truncate(filepath.Join(t3, "etc/app.conf"), 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate of sealed etc/app.conf: %v, want EPERM", err)
	}
	buf := make([]byte, 64)
	if n, err := unix.Getxattr(filepath.Join(t3, "etc/app.conf"), "user.memfs.seals", buf); err != nil || string(buf[:n]) != "write,grow,shrink,seal" {
		t.Errorf("seals of etc/app.conf = %q, %v", buf[:max(n, 0)], err)
	}
	if got := readString(t, filepath.Join(t3, "etc/app.conf")); got != "conf=1\n" {
		t.Errorf("sealed etc/app.conf = %q", got)
	}
	if err := os.WriteFile(filepath.Join(t3, "etc/motd"), []byte("x"), 0o644); err != nil {
		t.Errorf("write of unsealed etc/motd: %v", err)
	}

	// imagePath: a directory of the image as the volume root.
	t4 := env.publish(t, "img-path", attrs("image", ref, "imagePath", "/data"))
	if entries, err := os.ReadDir(t4); err != nil || len(entries) != 2 {
		t.Errorf("imagePath /data root holds %v, %v; want keep and old", entries, err)
	}
	if got := readString(t, filepath.Join(t4, "keep")); got != "keep" {
		t.Errorf("keep = %q", got)
	}
	for _, p := range []string{"/etc/link", "/nope", "/etc/motd"} {
		_, err := env.publishErr(t, "img-badpath", attrs("image", ref, "imagePath", p), nil)
		if status.Code(err) != codes.NotFound || !strings.Contains(err.Error(), "volumeAttributes.imagePath") {
			t.Errorf("imagePath %s: %v, want NotFound naming imagePath", p, err)
		}
	}

	// Metrics and stats.
	text := scrape(t, env.metrics)
	if v, _ := metricValue(text, "csi_memfs_volume_copied_up_bytes", `volume_id="img-1"`); v <= 0 || v > 64<<10 {
		t.Errorf("img-1 copied up %v bytes; want the small file and a page or so of the big one", v)
	}
	if v, ok := metricValue(text, "csi_memfs_volume_copied_up_bytes", `volume_id="img-2"`); !ok || v != 0 {
		t.Errorf("img-2 copied up %v, %v; want 0", v, ok)
	}
	for name, want := range map[string]float64{
		`csi_memfs_image_pulls_total{result="success"}`: 1, "csi_memfs_image_cache_images": 1,
		"csi_memfs_image_cache_images_in_use": 1, `csi_memfs_image_pull_duration_seconds_count{result="success"}`: 1,
	} {
		if v, _ := metricValue(text, name); v != want {
			t.Errorf("%s = %v, want %v", name, v, want)
		}
	}
	if v, _ := metricValue(text, "csi_memfs_image_cache_bytes"); v < big {
		t.Errorf("csi_memfs_image_cache_bytes = %v", v)
	}
	if v, _ := metricValue(text, "csi_memfs_image_pull_bytes_total"); v <= 0 {
		t.Errorf("csi_memfs_image_pull_bytes_total = %v", v)
	}
	stats, err := env.node.NodeGetVolumeStats(context.Background(), &csi.NodeGetVolumeStatsRequest{VolumeId: "img-1", VolumePath: t1})
	if err != nil || stats.GetUsage()[0].GetUsed() < 1<<20 || stats.GetUsage()[0].GetTotal() != 16<<20 {
		t.Errorf("stats of img-1: %v, %v", stats, err)
	}
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
	for id, tg := range map[string]string{"img-1": t1, "img-2": t2, "img-seal": t3, "img-path": t4} {
		env.unpublish(t, id, tg)
	}
	env.assertClean(t)
	if got := readString(t, filepath.Join(trees[0], "etc/app.conf")); got != "conf=1\n" {
		t.Errorf("cached etc/app.conf = %q after sealing", got)
	}
}

// TestImageErrors checks the codes of failed image publishes, and that a
// failed publish leaves nothing behind.
func TestImageErrors(t *testing.T) {
	reg := newTestRegistry(t)
	reg.user, reg.pass = "alice", "s3cret-Pa55"
	private := reg.push("private:v1", buildImage(t, layer(t, fileEntry("f", "private"))))
	down := newTestRegistry(t)
	downRef := down.push("app:v1", buildImage(t, layer(t, fileEntry("f", "x"))))
	down.stop()
	env := startDriver(t, func(c *Config) { c.NodeBudget = 16 << 20 })

	const wrong = "wrong-Pa55word"
	for _, c := range []struct {
		name    string
		attrs   map[string]string
		secrets map[string]string
		code    codes.Code
		msg     string
	}{
		{"anonymous", attrs("image", private), nil, codes.PermissionDenied, "volumeAttributes.image"},
		{"wrong password", attrs("image", private), pullSecret(reg.host, "alice", wrong), codes.PermissionDenied, "volumeAttributes.image"},
		{"missing tag", attrs("image", reg.host+"/private:v2"), pullSecret(reg.host, "alice", "s3cret-Pa55"), codes.NotFound, "volumeAttributes.image"},
		{"missing repo", attrs("image", reg.host+"/nothing:v1"), pullSecret(reg.host, "alice", "s3cret-Pa55"), codes.NotFound, "volumeAttributes.image"},
		{"Never, not cached", attrs("image", private, "imagePullPolicy", "Never"), nil, codes.NotFound, "volumeAttributes.image"},
		{"registry down", attrs("image", downRef), nil, codes.Unavailable, "volumeAttributes.image"},
		{"bad reference", attrs("image", "Not A Ref"), nil, codes.InvalidArgument, "volumeAttributes.image"},
		{"bad digest", attrs("image", reg.host+"/private@sha256:"+strings.Repeat("z", 64)), nil, codes.InvalidArgument, "volumeAttributes.image"},
		{"bad policy", attrs("image", private, "imagePullPolicy", "Sometimes"), nil, codes.InvalidArgument, "volumeAttributes.imagePullPolicy"},
		{"bad imagePath", attrs("image", private, "imagePath", "../x"), nil, codes.InvalidArgument, "volumeAttributes.imagePath"},
	} {
		t.Run(c.name, func(t *testing.T) {
			_, err := env.publishErr(t, "vol-err", c.attrs, c.secrets)
			if status.Code(err) != c.code || !strings.Contains(err.Error(), c.msg) {
				t.Errorf("err = %v, want %v naming %s", err, c.code, c.msg)
			}
			if err != nil && (strings.Contains(err.Error(), wrong) || strings.Contains(err.Error(), "s3cret")) {
				t.Errorf("error quotes the secret: %v", err)
			}
			env.assertClean(t)
		})
	}
	// The right credentials work, and an image cached for one pod is not
	// handed to another without access when the policy is Always.
	tg, err := env.publishErr(t, "vol-ok", attrs("image", private), pullSecret(reg.host, "alice", "s3cret-Pa55"))
	if err != nil {
		t.Fatalf("publish with the right credentials: %v", err)
	}
	if got := readString(t, filepath.Join(tg, "f")); got != "private" {
		t.Errorf("f = %q", got)
	}
	if _, err := env.publishErr(t, "vol-always", attrs("image", private, "imagePullPolicy", "Always"), pullSecret(reg.host, "alice", wrong)); status.Code(err) != codes.PermissionDenied {
		t.Errorf("Always with wrong credentials on a cached image: %v, want PermissionDenied", err)
	}
	env.unpublish(t, "vol-ok", tg)
	env.assertClean(t)

	// Failures after the image is pinned and its lower opened undo that
	// too: the node budget is full; the target is not empty.
	fds := openFds(t)
	filler := env.publish(t, "filler", attrs("size", "16Mi"))
	secret := pullSecret(reg.host, "alice", "s3cret-Pa55")
	if _, err := env.publishErr(t, "vol-full", attrs("image", private), secret); status.Code(err) != codes.ResourceExhausted {
		t.Errorf("image volume past the node budget: %v, want ResourceExhausted", err)
	}
	env.unpublish(t, "filler", filler)
	busy := env.target(t, "vol-busy")
	os.MkdirAll(filepath.Join(busy, "x"), 0o755)
	req := pubReq("vol-busy", busy, attrs("image", private))
	req.Secrets = secret
	if _, err := env.node.NodePublishVolume(context.Background(), req); status.Code(err) != codes.FailedPrecondition {
		t.Errorf("image volume on a non-empty target: %v, want FailedPrecondition", err)
	}
	os.RemoveAll(busy)
	env.assertClean(t)
	if got := openFds(t); got > fds {
		t.Errorf("%d descriptors open, %d before the failed publishes", got, fds)
	}
	text := scrape(t, env.metrics)
	if v, _ := metricValue(text, `csi_memfs_image_pulls_total{result="unauthorized"}`); v < 3 {
		t.Errorf("unauthorized pulls = %v, want at least 3", v)
	}
	if v, _ := metricValue(text, `csi_memfs_image_pulls_total{result="unavailable"}`); v != 1 {
		t.Errorf("unavailable pulls = %v, want 1", v)
	}
}

// TestImageConcurrentPublishes publishes 20 volumes of one uncached image
// at once: the image is pulled once, and all of them serve it.
func TestImageConcurrentPublishes(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("app:v1", layeredImage(t, 64<<10))
	env := startDriver(t, func(c *Config) { c.DefaultVolumeSize = 1 << 20 })
	m0, b0 := reg.counts()

	const n = 20
	targets := make([]string, n)
	var wg sync.WaitGroup
	errs := make([]error, n)
	for i := range n {
		wg.Add(1)
		go func() {
			defer wg.Done()
			targets[i], errs[i] = env.publishErr(t, fmt.Sprintf("vol-%02d", i), attrs("image", ref), nil)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Errorf("publish %d: %v", i, err)
		} else if got := readString(t, filepath.Join(targets[i], "bin/tool")); got != "tool-v2" {
			t.Errorf("volume %d: bin/tool = %q", i, got)
		}
	}
	m, b := reg.counts()
	// A pull fetches the config and the three layers once; resolving the
	// tag costs at most a manifest GET per publish that arrived before the
	// image was known.
	if b-b0 != 4 {
		t.Errorf("%d blob GETs, want 4 (one pull: a config and three layers)", b-b0)
	}
	t.Logf("%d publishes: %d manifest GETs, %d blob GETs", n, m-m0, b-b0)
	text := scrape(t, env.metrics)
	if v, _ := metricValue(text, `csi_memfs_image_pulls_total{result="success"}`); v != 1 {
		t.Errorf("successful pulls = %v, want 1", v)
	}
	if v, _ := metricValue(text, `csi_memfs_image_cache_images_in_use`); v != 1 {
		t.Errorf("images in use = %v, want 1", v)
	}
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
	for i := range n {
		if errs[i] == nil {
			env.unpublish(t, fmt.Sprintf("vol-%02d", i), targets[i])
		}
	}
	env.assertClean(t)
}

// TestImagePullOutlivesPublish: a publish whose deadline passes during a
// slow pull fails with DeadlineExceeded; the retry joins the same pull.
func TestImagePullOutlivesPublish(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("slow:v1", buildImage(t, layer(t, fileEntry("f", "slow"))))
	env := startDriver(t, func(c *Config) { c.ImagePullProgressInterval = 200 * time.Millisecond })
	reg.setBlobDelay(time.Second)
	_, b0 := reg.counts()

	target := env.target(t, "slow")
	ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
	_, err := env.node.NodePublishVolume(ctx, pubReq("slow", target, attrs("image", ref)))
	cancel()
	if c := status.Code(err); c != codes.DeadlineExceeded {
		t.Fatalf("publish during a slow pull: %v, want DeadlineExceeded", err)
	}
	env.assertClean(t)
	if _, err := env.node.NodePublishVolume(context.Background(), pubReq("slow", target, attrs("image", ref))); err != nil {
		t.Fatalf("retried publish: %v", err)
	}
	if got := readString(t, filepath.Join(target, "f")); got != "slow" {
		t.Errorf("f = %q", got)
	}
	if _, b := reg.counts(); b-b0 != 2 {
		t.Errorf("%d blob GETs, want 2 (one pull of a config and a layer)", b-b0)
	}
	env.unpublish(t, "slow", target)
	env.assertClean(t)
}

// TestImageGC: under a small cache budget, an image in use is never
// collected; it is once its last volume goes.
func TestImageGC(t *testing.T) {
	reg := newTestRegistry(t)
	refA := reg.push("a:v1", buildImage(t, layer(t, fileEntry("f", strings.Repeat("a", 64<<10)))))
	refB := reg.push("b:v1", buildImage(t, layer(t, fileEntry("f", strings.Repeat("b", 64<<10)))))
	refC := reg.push("c:v1", buildImage(t, layer(t, fileEntry("f", strings.Repeat("c", 64<<10)))))
	// Room for about one image's tree; each one's layers alone fit.
	env := startDriver(t, func(c *Config) { c.ImageCacheBudget = 100 << 10 })

	ta := env.publish(t, "vol-a", attrs("image", refA))
	tb := env.publish(t, "vol-b", attrs("image", refB))
	env.d.images.GC()
	if n := len(env.cachedTrees(t)); n != 2 {
		t.Errorf("%d images cached, want 2: both are in use, over the budget", n)
	}
	for tg, want := range map[string]byte{ta: 'a', tb: 'b'} {
		if got := readString(t, filepath.Join(tg, "f")); len(got) != 64<<10 || got[0] != want {
			t.Errorf("%s/f: %d bytes", tg, len(got))
		}
	}
	env.unpublish(t, "vol-a", ta)
	// Releasing a collects it (the cache is over budget, a is unused).
	if trees := env.cachedTrees(t); len(trees) != 1 {
		t.Errorf("%d images cached after a's volume went, want 1 (b)", len(trees))
	}
	tc := env.publish(t, "vol-c", attrs("image", refC))
	if got := readString(t, filepath.Join(tb, "f")); len(got) != 64<<10 {
		t.Errorf("b's volume after c's pull: %d bytes", len(got))
	}
	text := scrape(t, env.metrics)
	if v, _ := metricValue(text, "csi_memfs_image_cache_evictions_total"); v < 1 {
		t.Errorf("evictions = %v", v)
	}
	env.unpublish(t, "vol-b", tb)
	env.unpublish(t, "vol-c", tc)
	env.assertClean(t)
}

// TestImageRestart kills a serve process (SIGKILL) with an image volume
// published, restarts it on the warm cache with a tiny cache budget
// and the registry gone, and checks the image stays pinned for the lost
// volume, serves a new volume from the cache, and everything unpublishes.
func TestImageRestart(t *testing.T) {
	requireFUSE(t)
	reg := newTestRegistry(t)
	ref := reg.push("app:v1", layeredImage(t, 16<<10))
	refB := reg.push("b:v1", buildImage(t, layer(t, fileEntry("f", "b"))))
	root := t.TempDir()
	ctx := context.Background()
	// Less than app's tree, so b is collected once unused; more than
	// app's compressed layers (checked before a pull) and its file
	// contents (checked while flattening).
	budget := []string{"--image-cache-budget", "24Ki"}
	p := startServe(t, root, budget...)
	conn := dial(t, p.endpoint)
	node := csi.NewNodeClient(conn)
	target := func(id string) string {
		os.MkdirAll(filepath.Join(root, "pods", id), 0o755)
		return filepath.Join(root, "pods", id, "mount")
	}
	t1, t2 := target("vol-1"), target("vol-2")
	if _, err := node.NodePublishVolume(ctx, pubReq("vol-1", t1, attrs("image", ref))); err != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := node.NodePublishVolume(ctx, pubReq("vol-b", target("vol-b"), attrs("image", refB))); err != nil {
		t.Fatalf("publish: %v", err)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-b", TargetPath: target("vol-b")}); err != nil {
		t.Fatal(err)
	}
	os.WriteFile(filepath.Join(t1, "etc/motd"), []byte("mine"), 0o644)
	conn.Close()
	trees, _ := filepath.Glob(filepath.Join(root, "state", "images", "images", "sha256-*"))
	if len(trees) != 1 {
		t.Fatalf("%d images cached before the restart, want 1 (b is collected under a 24 KiB budget)", len(trees))
	}
	p.cmd.Process.Kill()
	p.cmd.Wait()
	reg.stop()

	p2 := startServe(t, root, budget...)
	conn = dial(t, p2.endpoint)
	defer conn.Close()
	node = csi.NewNodeClient(conn)
	text := scrape(t, "http://"+p2.metrics)
	if v, _ := metricValue(text, "csi_memfs_image_cache_images_in_use"); v != 1 {
		t.Errorf("images in use after the restart = %v, want 1 (re-pinned for the lost volume)", v)
	}
	// A new volume of the image is served from the cache (no registry),
	// and collection after it leaves the image alone.
	if _, err := node.NodePublishVolume(ctx, pubReq("vol-2", t2, attrs("image", ref))); err != nil {
		t.Fatalf("publish from the warm cache: %v", err)
	}
	if got := readString(t, filepath.Join(t2, "etc/motd")); got != "hello\n" {
		t.Errorf("etc/motd = %q", got)
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-2", TargetPath: t2}); err != nil {
		t.Errorf("unpublish vol-2: %v", err)
	}
	if after, _ := filepath.Glob(filepath.Join(root, "state", "images", "images", "sha256-*")); len(after) != 1 {
		t.Errorf("%d images cached while the lost volume uses one, want 1", len(after))
	}
	if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-1", TargetPath: t1}); err != nil {
		t.Errorf("unpublish the lost volume: %v", err)
	}
	if m := mountsUnder(t, root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	text = scrape(t, "http://"+p2.metrics)
	if v, _ := metricValue(text, "csi_memfs_image_cache_images"); v != 0 {
		t.Errorf("images cached after the last volume went = %v, want 0 (2 KiB budget)", v)
	}
}
