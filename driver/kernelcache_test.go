package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

// kernelCacheImage pushes an image of n small files under lib/ and
// returns its reference; lib/fNN holds "file NN\n".
func kernelCacheImage(t *testing.T, n int) string {
	t.Helper()
	entries := []layerEntry{dirEntry("lib/")}
	for i := range n {
		entries = append(entries, fileEntry(fmt.Sprintf("lib/f%02d", i), fmt.Sprintf("file %02d\n", i)))
	}
	return newTestRegistry(t).push("libs:v1", buildImage(t, layer(t, entries...)))
}

// readLibs reads lib/f<from>..lib/f<to-1> of the volume at target and
// checks their contents.
func readLibs(t *testing.T, target string, from, to int) {
	t.Helper()
	for i := from; i < to; i++ {
		if got, want := readString(t, filepath.Join(target, "lib", fmt.Sprintf("f%02d", i))), fmt.Sprintf("file %02d\n", i); got != want {
			t.Fatalf("lib/f%02d: %q, want %q", i, got, want)
		}
	}
}

// opCount is how many FUSE requests of op the plugin whose metrics are at
// base has served.
func opCount(t *testing.T, base, op string) float64 {
	t.Helper()
	v, _ := metricValue(scrape(t, base), "csi_memfs_fuse_operation_duration_seconds_count", `op="`+op+`"`)
	return v
}

// TestKernelCacheVolume publishes read-only image volumes over the gRPC
// socket with and without kernelCache. With it, the kernel opens files
// without asking the plugin (one OPEN, refused, for the whole volume) and
// a file read again costs no request; without it, every
// open is an OPEN. kernelCache on a writable volume, or not a boolean, is
// refused naming the attribute, leaving nothing behind.
func TestKernelCacheVolume(t *testing.T) {
	const n = 40
	ref := kernelCacheImage(t, n)
	env := startDriver(t, nil)
	ctx := context.Background()

	target := env.target(t, "vol-kc")
	r := pubReq("vol-kc", target, attrs("image", ref, "kernelCache", "true"))
	r.Readonly = true
	if _, err := env.node.NodePublishVolume(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(target, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write into a kernelCache volume: %v, want EROFS", err)
	}
	if vols := env.d.Volumes(); len(vols) != 1 || !vols[0].KernelCache || !vols[0].ReadOnly {
		t.Errorf("the volume list: %+v, want one read-only kernelCache volume", vols)
	}
	readLibs(t, target, 0, n)
	opens, reads := opCount(t, env.metrics, "OPEN"), opCount(t, env.metrics, "READ")
	if opens != 1 || reads < n {
		t.Errorf("first reads of %d files: %v OPEN, %v READ; want 1 (refused) and at least %d", n, opens, reads, n)
	}
	readLibs(t, target, 0, n)
	if o, r2 := opCount(t, env.metrics, "OPEN"), opCount(t, env.metrics, "READ"); o != opens || r2 != reads {
		t.Errorf("reading the files again: OPEN %v -> %v, READ %v -> %v; want no request", opens, o, reads, r2)
	}

	// The same image read-only without kernelCache: an OPEN per open.
	plain := env.target(t, "vol-plain")
	r = pubReq("vol-plain", plain, attrs("image", ref))
	r.Readonly = true
	if _, err := env.node.NodePublishVolume(ctx, r); err != nil {
		t.Fatal(err)
	}
	readLibs(t, plain, 0, n)
	if o := opCount(t, env.metrics, "OPEN"); o != opens+n {
		t.Errorf("reading %d files of a read-only volume without kernelCache: %v OPEN, want %v", n, o-opens, n)
	}
	env.unpublish(t, "vol-kc", target)
	env.unpublish(t, "vol-plain", plain)

	for _, c := range []struct {
		name     string
		a        map[string]string
		readOnly bool
		msg      []string
	}{
		{"kernelCache on a writable volume", attrs("image", ref, "kernelCache", "true"), false,
			[]string{"volumeAttributes.kernelCache", "read-only volume"}},
		{"kernelCache not a boolean", attrs("kernelCache", "yes"), true, []string{"volumeAttributes.kernelCache", `"yes"`}},
	} {
		target := env.target(t, "vol-bad")
		r := pubReq("vol-bad", target, c.a)
		r.Readonly = c.readOnly
		_, err := env.node.NodePublishVolume(ctx, r)
		wantCode(t, c.name, err, codes.InvalidArgument, c.msg...)
		env.assertFreed(t)
	}
}

// TestKernelCacheAcrossTakeover: a kernelCache volume's files are read by
// node id (the kernel never opens them through the plugin), so a
// successor must serve such reads of files it never saw opened: after a
// planned handover and after a SIGKILL with the holder, files read before
// still read from the kernel's cache, files never read come through the
// new process, and neither process is ever sent an OPEN for them.
func TestKernelCacheAcrossTakeover(t *testing.T) {
	requireFUSE(t)
	const n = 30
	root := t.TempDir()
	os.Chmod(root, 0o755)
	ref := kernelCacheImage(t, n)
	startHolder(t, root)
	p1 := startServe(t, root)
	conn := dial(t, p1.endpoint)
	dir := filepath.Join(root, "pods", "vol-kc")
	os.MkdirAll(dir, 0o755)
	target := filepath.Join(dir, "mount")
	r := pubReq("vol-kc", target, attrs("image", ref, "kernelCache", "true"))
	r.Readonly = true
	if _, err := csi.NewNodeClient(conn).NodePublishVolume(context.Background(), r); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	readLibs(t, target, 0, n/3)

	p2 := startServe(t, root)
	waitMetric(t, p2, 1, "csi_memfs_takeovers_total", `from="handover"`)
	waitMetric(t, p2, 1, "csi_memfs_volumes_recovered_total")
	p1.cmd.Process.Signal(unix.SIGTERM)
	if err := p1.cmd.Wait(); err != nil {
		t.Errorf("the handed-over process exited with %v", err)
	}
	readLibs(t, target, 0, 2*n/3)
	base := "http://" + p2.metrics
	if o, rd := opCount(t, base, "OPEN"), opCount(t, base, "READ"); o != 0 || rd < n/3 {
		t.Errorf("after the handover: %v OPEN, %v READ; want 0 and at least %d", o, rd, n/3)
	}

	p2.cmd.Process.Kill()
	p2.cmd.Wait()
	p3 := startServe(t, root)
	waitMetric(t, p3, 1, "csi_memfs_takeovers_total", `from="holder"`)
	waitMetric(t, p3, 1, "csi_memfs_volumes_recovered_total")
	readLibs(t, target, 0, n)
	base = "http://" + p3.metrics
	if o, rd := opCount(t, base, "OPEN"), opCount(t, base, "READ"); o != 0 || rd < n/3 {
		t.Errorf("after the crash: %v OPEN, %v READ; want 0 and at least %d", o, rd, n/3)
	}

	conn = dial(t, p3.endpoint)
	defer conn.Close()
	if _, err := csi.NewNodeClient(conn).NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-kc", TargetPath: target}); err != nil {
		t.Errorf("unpublish: %v", err)
	}
	if left := mountsUnder(t, root); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
}
