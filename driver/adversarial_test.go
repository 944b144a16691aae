package driver

// The adversarial suite: what a hostile or unlucky pod, kubelet or node
// does to the plugin, through the real socket and real mounts. Every
// resource must stay bounded and visible, and no request may wedge or
// stop the plugin.

import (
	"archive/tar"
	"bufio"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// wantCode fails t unless err has code and its message contains every
// one of substrs.
func wantCode(t testing.TB, what string, err error, code codes.Code, substrs ...string) {
	t.Helper()
	if status.Code(err) != code {
		t.Errorf("%s: %v, want %v", what, err, code)
		return
	}
	for _, s := range substrs {
		if !strings.Contains(status.Convert(err).Message(), s) {
			t.Errorf("%s: %q does not name %q", what, status.Convert(err).Message(), s)
		}
	}
}

// assertFreed checks that the driver holds nothing: no volume, no
// reservation, no journal record, no mount under the test's root.
func (env *testEnv) assertFreed(t testing.TB) {
	t.Helper()
	if n := env.d.vols.len(); n != 0 {
		t.Errorf("%d volumes still registered", n)
	}
	if b := env.d.budget.bytes.Load(); b != 0 {
		t.Errorf("%d bytes still reserved", b)
	}
	if entries, _ := os.ReadDir(env.d.journal.dir); len(entries) != 0 {
		t.Errorf("journal entries left: %d", len(entries))
	}
	if m := mountsUnder(t, env.root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
}

// abortConnection aborts the FUSE connection mounted on target, as a dead
// server leaves it: the mount answers ENOTCONN.
func abortConnection(t testing.TB, target string) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil {
		t.Fatal(err)
	}
	abort := fmt.Sprintf("/sys/fs/fuse/connections/%d/abort", unix.Minor(st.Dev))
	if err := os.WriteFile(abort, []byte("1"), 0o200); err != nil {
		t.Skipf("cannot abort a FUSE connection: %v", err)
	}
	if _, err := os.ReadDir(target); err == nil {
		t.Fatalf("%s still answers after its connection was aborted", target)
	}
}

// TestUnpublishInEveryState unpublishes volumes whose target was
// unmounted, removed, killed or never there: each unpublish succeeds,
// again and again, and frees everything.
func TestUnpublishInEveryState(t *testing.T) {
	env := startDriver(t, func(c *Config) { c.NodeBudget = 64 << 20 })
	ctx := context.Background()
	unpublish := func(id, target string) {
		t.Helper()
		for try := range 2 {
			if _, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Errorf("unpublish %s (try %d): %v", id, try, err)
			}
		}
	}
	for _, c := range []struct {
		name string
		do   func(t *testing.T, target string)
	}{
		{"target gone", func(t *testing.T, target string) {
			if err := unix.Unmount(target, 0); err != nil {
				t.Fatal(err)
			}
			if err := os.Remove(target); err != nil {
				t.Fatal(err)
			}
		}},
		{"target not a mount", func(t *testing.T, target string) {
			if err := unix.Unmount(target, 0); err != nil {
				t.Fatal(err)
			}
		}},
		{"target a dead mount", func(t *testing.T, target string) { abortConnection(t, target) }},
		{"target detached while busy", func(t *testing.T, target string) {
			holdOpen(t, filepath.Join(target, "open"))
			if err := unix.Unmount(target, unix.MNT_DETACH); err != nil {
				t.Fatal(err)
			}
		}},
	} {
		t.Run(c.name, func(t *testing.T) {
			id := "vol-" + strings.ReplaceAll(c.name, " ", "-")
			target := env.publish(t, id, attrs("size", "4Mi"))
			c.do(t, target)
			unpublish(id, target)
			env.assertFreed(t)
			if _, err := os.Lstat(target); !os.IsNotExist(err) {
				t.Errorf("target %s left: %v", target, err)
			}
		})
	}
	t.Run("file held open on the target", func(t *testing.T) {
		// Unpublish ends the busy connection after a grace period instead
		// of waiting for the file to close, and counts it.
		target := env.publish(t, "vol-held", attrs("size", "4Mi"))
		holdOpen(t, filepath.Join(target, "open"))
		start := time.Now()
		unpublish("vol-held", target)
		if d := time.Since(start); d > 30*time.Second {
			t.Errorf("unpublish with a file open took %v", d)
		}
		env.assertFreed(t)
		if v, _ := metricValue(scrape(t, env.metrics), "csi_memfs_forced_unmounts_total"); v != 1 {
			t.Errorf("csi_memfs_forced_unmounts_total = %v, want 1", v)
		}
	})
	t.Run("volume unknown", func(t *testing.T) {
		unpublish("vol-never", env.target(t, "vol-never"))
		target := env.target(t, "vol-never-dir")
		os.Mkdir(target, 0o750)
		unpublish("vol-never", target)
		env.assertFreed(t)
	})
}

// TestPublishRefusesAMountedTarget publishes a second volume on a target
// another volume is mounted on: refused, and the first keeps working.
func TestPublishRefusesAMountedTarget(t *testing.T) {
	env := startDriver(t, nil)
	ctx := context.Background()
	target := env.publish(t, "vol-under", attrs())
	if err := os.WriteFile(filepath.Join(target, "f"), []byte("under"), 0o644); err != nil {
		t.Fatal(err)
	}
	os.Remove(filepath.Join(target, "f")) // an empty root
	_, err := env.node.NodePublishVolume(ctx, pubReq("vol-over", target, attrs()))
	wantCode(t, "publish on a mounted target", err, codes.FailedPrecondition, "target_path", target)
	if err := os.WriteFile(filepath.Join(target, "g"), []byte("still"), 0o644); err != nil {
		t.Errorf("the first volume after the refused publish: %v", err)
	}
	env.unpublish(t, "vol-under", target)
	env.assertFreed(t)
}

// TestTargetPaths publishes on targets kubelet would never give: outside
// its pods directory, through a symlink, on a symlink, or with no parent.
// Each is refused naming target_path, and nothing is mounted anywhere.
func TestTargetPaths(t *testing.T) {
	env := startDriver(t, nil)
	ctx := context.Background()
	elsewhere := t.TempDir()
	pods := filepath.Join(env.root, "pods")
	os.MkdirAll(filepath.Join(pods, "real"), 0o755)
	if err := os.Symlink(elsewhere, filepath.Join(pods, "link")); err != nil {
		t.Fatal(err)
	}
	if err := os.Symlink(elsewhere, filepath.Join(pods, "real", "mount-link")); err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		name, target string
		code         codes.Code
		msg          string
	}{
		{"outside kubelet's directory", filepath.Join(elsewhere, "mount"), codes.InvalidArgument, "not under kubelet's pods directory"},
		{"kubelet's directory itself", filepath.Join(env.root, "mount"), codes.InvalidArgument, "not under kubelet's pods directory"},
		{"escaping with ..", pods + "/../../mount", codes.InvalidArgument, "not under kubelet's pods directory"},
		{"through a symlink", filepath.Join(pods, "link", "mount"), codes.InvalidArgument, "symlink"},
		{"on a symlink", filepath.Join(pods, "real", "mount-link"), codes.InvalidArgument, "symlink"},
		{"no parent", filepath.Join(pods, "missing", "mount"), codes.FailedPrecondition, "parent directory does not exist"},
	} {
		_, err := env.node.NodePublishVolume(ctx, pubReq("vol-t", c.target, attrs()))
		wantCode(t, c.name, err, c.code, "target_path", c.msg)
	}
	if entries, _ := os.ReadDir(elsewhere); len(entries) != 0 {
		t.Errorf("the symlinks' destination was written to: %d entries", len(entries))
	}
	if m := mountsUnder(t, elsewhere); len(m) > 0 {
		t.Errorf("mounted through a symlink: %v", m)
	}
	// Unpublish never follows the symlinks either.
	for _, target := range []string{filepath.Join(pods, "link", "mount"), filepath.Join(pods, "real", "mount-link")} {
		if _, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-t", TargetPath: target}); err != nil {
			t.Errorf("unpublish at %s: %v", target, err)
		}
	}
	if _, err := os.Lstat(filepath.Join(pods, "real", "mount-link")); err != nil {
		t.Errorf("unpublish removed a symlink that was not its: %v", err)
	}
	env.assertFreed(t)
}

// TestSealGlobOverHardLinks seals, with one glob, a file and a hard link
// to it: the inode is sealed once, and the publish succeeds.
func TestSealGlobOverHardLinks(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("links:v1", buildImage(t, layer(t, fileEntry("ok.txt", "sealed\n"), hardlinkEntry("hl", "ok.txt"))))
	env := startDriver(t, nil)
	target := env.publish(t, "vol-seal", attrs("image", ref, "seal", "*"))
	for _, name := range []string{"ok.txt", "hl"} {
		buf := make([]byte, 64)
		n, err := unix.Getxattr(filepath.Join(target, name), "user.memfs.seals", buf)
		if err != nil || string(buf[:n]) != "write,grow,shrink,seal" {
			t.Errorf("%s: seals %q, %v", name, buf[:max(n, 0)], err)
		}
		if _, err := os.OpenFile(filepath.Join(target, name), os.O_WRONLY, 0); err == nil {
			t.Errorf("%s: opened for writing", name)
		}
	}
	env.unpublish(t, "vol-seal", target)
	env.assertFreed(t)
}

// TestRestartWithDamagedRecords restarts the plugin after a crash with one
// garbage and one empty journal record among good ones: the good volumes
// are served again, the two are set aside as lost (and counted), and
// their unpublish frees their target and memory.
func TestRestartWithDamagedRecords(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	ctx := context.Background()
	startHolder(t, root)
	p1 := startServe(t, root)
	conn := dial(t, p1.endpoint)
	node := csi.NewNodeClient(conn)
	targets := map[string]string{}
	for _, id := range []string{"vol-a", "vol-bad", "vol-c"} {
		targets[id] = filepath.Join(root, "pods", id, "mount")
		os.MkdirAll(filepath.Dir(targets[id]), 0o755)
		if _, err := node.NodePublishVolume(ctx, pubReq(id, targets[id], attrs("size", "4Mi"))); err != nil {
			t.Fatalf("publish %s: %v", id, err)
		}
		if err := os.WriteFile(filepath.Join(targets[id], "data"), []byte(id), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	conn.Close()
	p1.cmd.Process.Kill()
	p1.cmd.Wait()
	journal := filepath.Join(root, "state", "volumes")
	if err := os.WriteFile(filepath.Join(journal, "vol-bad", recordFile), []byte("{\x00garbage"), 0o600); err != nil {
		t.Fatal(err)
	}
	os.Mkdir(filepath.Join(journal, "vol-empty"), 0o700)
	if err := os.WriteFile(filepath.Join(journal, "vol-empty", recordFile), nil, 0o600); err != nil {
		t.Fatal(err)
	}

	p2 := startServe(t, root)
	waitMetric(t, p2, 2, "csi_memfs_volumes_recovered_total")
	waitMetric(t, p2, 2, "csi_memfs_volumes_lost_total")
	waitMetric(t, p2, 2, "csi_memfs_node_volumes", `state="lost"`)
	for _, id := range []string{"vol-a", "vol-c"} {
		if got := readString(t, filepath.Join(targets[id], "data")); got != id {
			t.Errorf("%s after the restart: %q", id, got)
		}
	}
	conn = dial(t, p2.endpoint)
	defer conn.Close()
	node = csi.NewNodeClient(conn)
	emptyTarget := filepath.Join(root, "pods", "vol-empty", "mount")
	for id, target := range map[string]string{"vol-a": targets["vol-a"], "vol-bad": targets["vol-bad"], "vol-c": targets["vol-c"], "vol-empty": emptyTarget} {
		for range 2 {
			if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
				t.Errorf("unpublish %s: %v", id, err)
			}
		}
		if _, err := os.Lstat(target); !os.IsNotExist(err) {
			t.Errorf("%s: target left: %v", id, err)
		}
	}
	waitMetric(t, p2, 0, "csi_memfs_node_volumes", `state="lost"`)
	if m := mountsUnder(t, root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
	if entries, _ := os.ReadDir(journal); len(entries) > 0 {
		t.Errorf("journal entries left: %d", len(entries))
	}
}

// TestLostVolumesCounted crashes the plugin with no holder: its volume is
// lost, and the successor counts it.
func TestLostVolumesCounted(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	ctx := context.Background()
	p1 := startServe(t, root)
	conn := dial(t, p1.endpoint)
	target := filepath.Join(root, "pods", "vol-l", "mount")
	os.MkdirAll(filepath.Dir(target), 0o755)
	if _, err := csi.NewNodeClient(conn).NodePublishVolume(ctx, pubReq("vol-l", target, attrs("size", "4Mi"))); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	p1.cmd.Process.Kill()
	p1.cmd.Wait()
	p2 := startServe(t, root)
	waitMetric(t, p2, 1, "csi_memfs_volumes_lost_total")
	conn = dial(t, p2.endpoint)
	defer conn.Close()
	if _, err := csi.NewNodeClient(conn).NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-l", TargetPath: target}); err != nil {
		t.Errorf("unpublish: %v", err)
	}
	if m := mountsUnder(t, root); len(m) > 0 {
		t.Errorf("mounts left: %v", m)
	}
}

// TestTakeoverPauseIsTheHandover hands volumes over while the old process
// waits for a slow image pull: the pause the successor reports is the
// time the volumes went unserved, not the wait before.
func TestTakeoverPauseIsTheHandover(t *testing.T) {
	requireFUSE(t)
	reg := newTestRegistry(t)
	ref := reg.push("slow:v1", buildImage(t, layer(t, fileEntry("f", "slow"))))
	root := t.TempDir()
	ctx := context.Background()
	p1 := startServe(t, root)
	conn := dial(t, p1.endpoint)
	defer conn.Close()
	node := csi.NewNodeClient(conn)
	target := func(id string) string {
		os.MkdirAll(filepath.Join(root, "pods", id), 0o755)
		return filepath.Join(root, "pods", id, "mount")
	}
	if _, err := node.NodePublishVolume(ctx, pubReq("vol-p", target("vol-p"), attrs("size", "4Mi"))); err != nil {
		t.Fatal(err)
	}
	const delay = 4 * time.Second
	reg.setBlobDelay(delay)
	slow := make(chan error, 1)
	go func() {
		_, err := node.NodePublishVolume(ctx, pubReq("vol-slow", target("vol-slow"), attrs("image", ref)))
		slow <- err
	}()
	time.Sleep(500 * time.Millisecond) // the pull is under way
	p2 := startServe(t, root)
	waitMetric(t, p2, 1, "csi_memfs_takeovers_total", `from="handover"`)
	if err := <-slow; err != nil {
		t.Errorf("the publish in flight during the handover: %v", err)
	}
	pause, ok := metricValue(scrape(t, "http://"+p2.metrics), "csi_memfs_takeover_pause_seconds_sum", `from="handover"`)
	if !ok || pause > delay.Seconds()/2 {
		t.Errorf("takeover pause %.3f s, want well under the %v the old process waited for its publish", pause, delay)
	}
	if got := readString(t, filepath.Join(target("vol-slow"), "f")); got != "slow" {
		t.Errorf("the volume published during the handover: %q", got)
	}
	conn2 := dial(t, p2.endpoint)
	defer conn2.Close()
	for _, id := range []string{"vol-p", "vol-slow"} {
		if _, err := csi.NewNodeClient(conn2).NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target(id)}); err != nil {
			t.Errorf("unpublish %s: %v", id, err)
		}
	}
}

// TestAttributeBounds publishes volumes whose attributes the node cannot
// honour: each is refused with InvalidArgument naming the attribute.
func TestAttributeBounds(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("tree:v1", buildImage(t, layer(t, dirEntry("a/"), dirEntry("a/b/"), fileEntry("a/b/c", "c"))))
	env := startDriver(t, nil)
	for _, c := range []struct {
		name  string
		attrs map[string]string
		msg   []string
	}{
		{"a one-byte volume", attrs("size", "1"), []string{"volumeAttributes.size", "1Mi"}},
		{"a volume under the minimum", attrs("size", "1023Ki"), []string{"volumeAttributes.size", "1Mi"}},
		{"one inode over an image", attrs("image", ref, "inodes", "1"), []string{"volumeAttributes.inodes"}},
		{"one inode, sealing", attrs("image", ref, "inodes", "1", "seal", "a/b/c"), []string{"volumeAttributes.inodes"}},
		{"noswap not a boolean", attrs("noswap", "yes"), []string{"volumeAttributes.noswap"}},
	} {
		_, err := env.publishErr(t, "vol-bounds", c.attrs, nil)
		wantCode(t, c.name, err, codes.InvalidArgument, c.msg...)
		env.assertFreed(t)
	}
}

// TestSafeDefaults checks the bounds a node has with no flag set, that a
// volume's default inode limit stays within --max-volume-inodes, and that
// a noswap volume's memory layer is mounted noswap.
func TestSafeDefaults(t *testing.T) {
	if c, err := (Config{NodeID: "n", StateDir: "/s"}).withDefaults(); err != nil ||
		c.MaxVolumeSize != 1<<30 || c.MaxVolumeInodes != 1_000_000 || c.KubeletDir != "/var/lib/kubelet" {
		t.Errorf("defaults: size %d, inodes %d, kubelet %q, %v", c.MaxVolumeSize, c.MaxVolumeInodes, c.KubeletDir, err)
	}
	env := startDriver(t, func(c *Config) { c.MaxVolumeInodes = 5000 })
	target := env.publish(t, "vol-big", attrs("size", "256Mi"))
	var st unix.Statfs_t
	if err := unix.Statfs(target, &st); err != nil || st.Files != 5000 {
		t.Errorf("inode limit of a 256Mi volume: %d, %v; want --max-volume-inodes, 5000", st.Files, err)
	}
	env.unpublish(t, "vol-big", target)
	target = env.publish(t, "vol-noswap", attrs("noswap", "true"))
	mi, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	upper := env.d.journal.upperDir("vol-noswap")
	found := false
	for _, line := range strings.Split(string(mi), "\n") {
		if f := strings.Fields(line); len(f) > 4 && unescapeMount(f[4]) == upper {
			found = true
			if !strings.Contains(line, "noswap") {
				t.Errorf("memory layer of a noswap volume: %s", line)
			}
		}
	}
	if !found {
		t.Errorf("no memory layer mounted on %s", upper)
	}
	env.unpublish(t, "vol-noswap", target)
	env.assertFreed(t)
}

// TestHostileVolumes publishes what a hostile image or pod brings: paths
// and links out of the tree, symlinks where a directory is expected,
// forged internal attributes, device nodes. Nothing reaches a host path,
// nothing internal shows, no device opens.
func TestHostileVolumes(t *testing.T) {
	reg := newTestRegistry(t)
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "x.json"), []byte("host"), 0o644)
	escape := reg.push("escape:v1", buildImage(t, layer(t, fileEntry("../escape", "x"))))
	hardOut := reg.push("hardout:v1", buildImage(t, layer(t, fileEntry("f", "x"), hardlinkEntry("h", "../../../etc/passwd"))))
	links := reg.push("links:v1", buildImage(t, layer(t,
		symlinkEntry("cfg", outside), symlinkEntry("etc", "/etc"), dirEntry("data/"), fileEntry("data/f", "f"),
		layerEntry{Name: "data/dev", Type: tar.TypeChar, Mode: 0o666, Dev: 1},
		layerEntry{Name: "data/forged", Type: tar.TypeReg, Mode: 0o644, Body: "forged",
			Xattrs: map[string]string{"trusted.memfs.whiteout": "y", "user.memfs.seals": "write"}},
	)))
	env := startDriver(t, nil)
	ctx := context.Background()

	for _, ref := range []string{escape, hardOut} {
		_, err := env.publishErr(t, "vol-hostile", attrs("image", ref), nil)
		wantCode(t, ref, err, codes.FailedPrecondition, "volumeAttributes.image")
		env.assertFreed(t)
	}
	_, err := env.publishErr(t, "vol-hostile", attrs("image", links, "imagePath", "/etc"), nil)
	wantCode(t, "imagePath through a symlink", err, codes.NotFound, "volumeAttributes.imagePath")
	env.assertFreed(t)

	target, err := env.publishErr(t, "vol-links", attrs("image", links, "seal", "cfg/*.json,data/*"), nil)
	if err != nil {
		t.Fatalf("publish: %v", err)
	}
	if l, err := os.Readlink(filepath.Join(target, "cfg")); err != nil || l != outside {
		t.Errorf("cfg: %q, %v", l, err)
	}
	if n, err := unix.Getxattr(filepath.Join(outside, "x.json"), "user.memfs.seals", make([]byte, 64)); err == nil {
		t.Errorf("a host file behind a symlink was sealed (%d bytes)", n)
	}
	// The forged file: sealed by the glob, not by its image attribute;
	// internal names neither listed nor readable nor writable.
	forged := filepath.Join(target, "data", "forged")
	buf := make([]byte, 4096)
	if n, err := unix.Getxattr(forged, "user.memfs.seals", buf); err != nil || string(buf[:n]) != "write,grow,shrink,seal" {
		t.Errorf("seals of data/forged: %q, %v", buf[:max(n, 0)], err)
	}
	for _, p := range []string{target, filepath.Join(target, "data"), forged} {
		n, err := unix.Listxattr(p, buf)
		if err != nil {
			t.Errorf("listxattr %s: %v", p, err)
			continue
		}
		if strings.Contains(string(buf[:n]), "trusted.memfs.") {
			t.Errorf("listxattr %s shows internal names: %q", p, buf[:n])
		}
		if _, err := unix.Getxattr(p, "trusted.memfs.whiteout", buf); err == nil {
			t.Errorf("getxattr trusted.memfs.whiteout on %s answered", p)
		}
	}
	os.Remove(filepath.Join(target, "data", "f")) // a whiteout in the upper
	if n, err := unix.Listxattr(filepath.Join(target, "data"), buf); err == nil && strings.Contains(string(buf[:n]), "trusted.memfs.") {
		t.Errorf("listxattr after a whiteout: %q", buf[:n])
	}
	scratch := filepath.Join(target, "scratch")
	os.WriteFile(scratch, nil, 0o644)
	for _, name := range []string{"trusted.memfs.whiteout", "trusted.memfs.opaque", "trusted.memfs.seals"} {
		if err := unix.Setxattr(scratch, name, []byte("y"), 0); err == nil {
			t.Errorf("setxattr %s accepted", name)
		}
	}
	if _, err := os.Stat(scratch); err != nil {
		t.Errorf("a file given a forged whiteout is gone: %v", err)
	}
	// Device nodes: the image's and a new one stay inert (nodev).
	if fi, err := os.Lstat(filepath.Join(target, "data", "dev")); err == nil && fi.Mode()&os.ModeDevice != 0 {
		if f, err := os.Open(filepath.Join(target, "data", "dev")); err == nil {
			f.Close()
			t.Error("opened the image's device node")
		}
	}
	if err := unix.Mknod(filepath.Join(target, "null"), unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3))); err == nil {
		if f, err := os.OpenFile(filepath.Join(target, "null"), os.O_WRONLY, 0); err == nil {
			f.Close()
			t.Error("opened a device node made in the volume")
		}
	}
	if _, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-links", TargetPath: target}); err != nil {
		t.Errorf("unpublish: %v", err)
	}
	env.assertFreed(t)
	if b, err := os.ReadFile(filepath.Join(outside, "x.json")); err != nil || string(b) != "host" {
		t.Errorf("host file: %q, %v", b, err)
	}
}

// holdOpen has a process outside the test binary hold path open for
// writing until the test ends, so that a wedged connection cannot hang
// the test itself.
func holdOpen(t *testing.T, path string) {
	t.Helper()
	holder := exec.Command("sh", "-c", "exec 3>"+path+"; echo ready; exec sleep 600")
	out, _ := holder.StdoutPipe()
	if err := holder.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { holder.Process.Kill(); holder.Wait() })
	if _, err := bufio.NewReader(out).ReadString('\n'); err != nil {
		t.Fatal(err)
	}
}
