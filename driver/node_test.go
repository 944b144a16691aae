package driver

import (
	"bytes"
	"context"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-memfs/csi-memfs/memfs"
)

// TestHandlerErrors checks the code of every handler's answers over the
// socket, and that a refused publish leaves nothing behind.
func TestHandlerErrors(t *testing.T) {
	env := startDriver(t, func(c *Config) {
		c.NodeBudget = 48 << 20
		c.MaxVolumeSize = 1 << 30
		c.MaxVolumes = 3
	})
	ctx := context.Background()
	published := env.publish(t, "vol-a", attrs("size", "16Mi"))

	nonEmpty := env.target(t, "non-empty")
	os.Mkdir(nonEmpty, 0o755)
	os.WriteFile(filepath.Join(nonEmpty, "x"), nil, 0o644)

	pub := func(mut func(*csi.NodePublishVolumeRequest)) func() error {
		return func() error {
			r := pubReq("vol-b", env.target(t, "vol-b"), attrs())
			mut(r)
			_, err := env.node.NodePublishVolume(ctx, r)
			return err
		}
	}
	mode := func(m csi.VolumeCapability_AccessMode_Mode) func(*csi.NodePublishVolumeRequest) {
		return func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = mountCap(m) }
	}
	again := func(mut func(*csi.NodePublishVolumeRequest)) func() error {
		return func() error {
			r := pubReq("vol-a", published, attrs("size", "16Mi"))
			mut(r)
			_, err := env.node.NodePublishVolume(ctx, r)
			return err
		}
	}
	unpub := func(id, target string) func() error {
		return func() error {
			_, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target})
			return err
		}
	}
	stats := func(id, path string) func() error {
		return func() error {
			_, err := env.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: path})
			return err
		}
	}
	tests := []struct {
		name string
		call func() error
		code codes.Code
		msg  string
	}{
		{"publish: no volume id", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeId = "" }), codes.InvalidArgument, "volume_id is required"},
		{"publish: bad volume id", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeId = "../x" }), codes.InvalidArgument, "volume_id"},
		{"publish: no target", pub(func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "" }), codes.InvalidArgument, "target_path is required"},
		{"publish: relative target", pub(func(r *csi.NodePublishVolumeRequest) { r.TargetPath = "a/b" }), codes.InvalidArgument, "absolute"},
		{"publish: no capability", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability = nil }), codes.InvalidArgument, "volume_capability is required"},
		{"publish: block", pub(func(r *csi.NodePublishVolumeRequest) {
			r.VolumeCapability.AccessType = &csi.VolumeCapability_Block{Block: &csi.VolumeCapability_BlockVolume{}}
		}), codes.InvalidArgument, "block access"},
		{"publish: fs type", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().FsType = "ext4" }), codes.InvalidArgument, "fs_type"},
		{"publish: mount flags", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().MountFlags = []string{"exec"} }), codes.InvalidArgument, "mount_flags"},
		{"publish: mount group", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().VolumeMountGroup = "wheel" }), codes.InvalidArgument, "volume_mount_group"},
		{"publish: multi node", pub(mode(csi.VolumeCapability_AccessMode_MULTI_NODE_MULTI_WRITER)), codes.InvalidArgument, "access_mode"},
		{"publish: no access mode", pub(mode(csi.VolumeCapability_AccessMode_UNKNOWN)), codes.InvalidArgument, "access_mode"},
		{"publish: persistent", pub(func(r *csi.NodePublishVolumeRequest) { delete(r.VolumeContext, attrEphemeral) }), codes.InvalidArgument, "inline ephemeral volumes"},
		{"publish: unknown attribute", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["sizee"] = "1" }), codes.InvalidArgument, "unknown key"},
		{"publish: bad size", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["size"] = "big" }), codes.InvalidArgument, "volumeAttributes.size"},
		{"publish: image not cached, Never", pub(func(r *csi.NodePublishVolumeRequest) {
			r.VolumeContext["image"], r.VolumeContext["imagePullPolicy"] = "busybox:1.36", "Never"
		}), codes.NotFound, "volumeAttributes.image"},
		{"publish: local image, none configured", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["image"] = "oci:app" }), codes.InvalidArgument, "volumeAttributes.image"},
		{"publish: local image, path", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["image"] = "oci:../etc" }), codes.InvalidArgument, "volumeAttributes.image"},
		{"publish: bad pull secret", func() error {
			r := pubReq("vol-x", env.target(t, "vol-x"), attrs("image", "busybox:1.36"))
			r.Secrets = map[string]string{".dockerconfigjson": "{not json s3cret"}
			_, err := env.node.NodePublishVolume(ctx, r)
			if err != nil && strings.Contains(err.Error(), "s3cret") {
				t.Errorf("error quotes the secret: %v", err)
			}
			return err
		}, codes.InvalidArgument, "nodePublishSecretRef"},
		{"publish: over budget", pub(func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["size"] = "40Mi" }), codes.ResourceExhausted, "budget"},
		{"publish: target not empty", func() error {
			_, err := env.node.NodePublishVolume(ctx, pubReq("vol-c", nonEmpty, attrs()))
			return err
		}, codes.FailedPrecondition, "not empty"},
		{"publish: again", again(func(*csi.NodePublishVolumeRequest) {}), codes.OK, ""},
		{"publish: again, size", again(func(r *csi.NodePublishVolumeRequest) { r.VolumeContext["size"] = "8Mi" }), codes.AlreadyExists, "volume_context"},
		{"publish: again, readonly", again(func(r *csi.NodePublishVolumeRequest) { r.Readonly = true }), codes.AlreadyExists, "readonly"},
		{"publish: again, group", again(func(r *csi.NodePublishVolumeRequest) { r.VolumeCapability.GetMount().VolumeMountGroup = "5" }), codes.AlreadyExists, "volume_mount_group"},
		{"publish: again, other target", again(func(r *csi.NodePublishVolumeRequest) { r.TargetPath = env.target(t, "other") }), codes.FailedPrecondition, "one target path"},

		{"unpublish: no volume id", unpub("", published), codes.InvalidArgument, "volume_id is required"},
		{"unpublish: no target", unpub("vol-a", ""), codes.InvalidArgument, "target_path is required"},
		{"unpublish: unknown volume", unpub("vol-unknown", env.target(t, "vol-unknown")), codes.OK, ""},
		{"unpublish: other target", unpub("vol-a", env.target(t, "other")), codes.OK, ""},

		{"stats: no volume id", stats("", published), codes.InvalidArgument, "volume_id is required"},
		{"stats: no path", stats("vol-a", ""), codes.InvalidArgument, "volume_path is required"},
		{"stats: unknown volume", stats("vol-unknown", published), codes.NotFound, "not published"},
		{"stats: wrong path", stats("vol-a", "some/path"), codes.NotFound, "not published at some/path"},
		{"stats", stats("vol-a", published), codes.OK, ""},

		{"stage", func() error { _, err := env.node.NodeStageVolume(ctx, &csi.NodeStageVolumeRequest{}); return err }, codes.Unimplemented, ""},
		{"unstage", func() error { _, err := env.node.NodeUnstageVolume(ctx, &csi.NodeUnstageVolumeRequest{}); return err }, codes.Unimplemented, ""},
		{"expand", func() error { _, err := env.node.NodeExpandVolume(ctx, &csi.NodeExpandVolumeRequest{}); return err }, codes.Unimplemented, ""},
		{"health", func() error {
			_, err := env.node.NodeGetVolumeHealth(ctx, &csi.NodeGetVolumeHealthRequest{})
			return err
		}, codes.Unimplemented, ""},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if got := status.Code(err); got != tt.code {
				t.Fatalf("code = %v (%v), want %v", got, err, tt.code)
			}
			if !strings.Contains(status.Convert(err).Message(), tt.msg) {
				t.Errorf("message %q does not say %q", status.Convert(err).Message(), tt.msg)
			}
		})
	}

	// The refused publishes left nothing: only vol-a is mounted, recorded
	// and reserved, and vol-b's target was never created or was removed.
	if err := env.d.checkInvariants(); err != nil {
		t.Error(err)
	}
	if m := mountsUnder(t, env.root); len(m) != 2 {
		t.Errorf("mounts = %v, want vol-a's target and memory layer", m)
	}
	if entries, _ := os.ReadDir(env.d.journal.dir); len(entries) != 1 || entries[0].Name() != "vol-a" {
		t.Errorf("journal holds %v, want vol-a", entries)
	}
	if got := env.d.budget.bytes.Load(); got != 16<<20 {
		t.Errorf("budget reserves %d bytes, want %d", got, 16<<20)
	}
	if _, err := os.Stat(env.target(t, "vol-b")); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("vol-b's target: %v, want it absent", err)
	}

	// The volume limit.
	env.publish(t, "vol-d", attrs("size", "1Mi"))
	env.publish(t, "vol-e", attrs("size", "1Mi"))
	_, err := env.node.NodePublishVolume(ctx, pubReq("vol-f", env.target(t, "vol-f"), attrs("size", "1Mi")))
	if status.Code(err) != codes.ResourceExhausted || !strings.Contains(err.Error(), "--max-volumes") {
		t.Errorf("fourth volume: %v, want ResourceExhausted naming --max-volumes", err)
	}
	info, err := env.node.NodeGetInfo(ctx, &csi.NodeGetInfoRequest{})
	if err != nil || info.NodeId != "test-node" || info.MaxVolumesPerNode != 3 {
		t.Errorf("NodeGetInfo = %v, %v", info, err)
	}
}

func TestIdentity(t *testing.T) {
	env := startDriver(t, nil)
	ctx := context.Background()
	info, err := env.ident.GetPluginInfo(ctx, &csi.GetPluginInfoRequest{})
	if err != nil || info.Name != DefaultDriverName || info.VendorVersion != "test" {
		t.Errorf("GetPluginInfo = %v, %v", info, err)
	}
	probe, err := env.ident.Probe(ctx, &csi.ProbeRequest{})
	if err != nil || !probe.GetReady().GetValue() {
		t.Errorf("Probe = %v, %v", probe, err)
	}
	caps, err := env.node.NodeGetCapabilities(ctx, &csi.NodeGetCapabilitiesRequest{})
	if err != nil || len(caps.Capabilities) != 2 {
		t.Errorf("NodeGetCapabilities = %v, %v", caps, err)
	}
}

// TestPublishAsAPod publishes a volume, uses it through the target path as
// a pod would, and checks that df, NodeGetVolumeStats and the metrics agree,
// that the size limit holds, and that seals hold.
func TestPublishAsAPod(t *testing.T) {
	env := startDriver(t, nil)
	ctx := context.Background()
	const id = "csi-0123456789abcdef"
	target := env.publish(t, id, attrs("size", "2Mi", "inodes", "100", "seal", "*.conf"))

	// The root is writable by everyone, like an emptyDir; a non-root pod
	// user writes and reads a file.
	var st unix.Stat_t
	if err := unix.Stat(target, &st); err != nil || st.Mode&0o7777 != 0o777 {
		t.Fatalf("root: mode %o, %v; want 0777", st.Mode&0o7777, err)
	}
	runAs(t, 1000, 1000, nil, "echo hello >"+target+"/greeting && cat "+target+"/greeting")
	data, err := os.ReadFile(filepath.Join(target, "greeting"))
	if err != nil || string(data) != "hello\n" {
		t.Fatalf("read back %q, %v", data, err)
	}
	if err := unix.Stat(filepath.Join(target, "greeting"), &st); err != nil || st.Uid != 1000 {
		t.Errorf("greeting: uid %d, %v; want 1000", st.Uid, err)
	}

	// Seal a file through the xattr: write opens fail with EPERM.
	cfg := filepath.Join(target, "app.conf")
	if err := os.WriteFile(cfg, []byte("k=v\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(cfg, memfs.SealsXattr, []byte("write,shrink"), 0); err != nil {
		t.Fatalf("seal: %v", err)
	}
	buf := make([]byte, 64)
	if n, err := unix.Getxattr(cfg, memfs.SealsXattr, buf); err != nil || string(buf[:n]) != "write,shrink" {
		t.Errorf("seals = %q, %v", buf[:n], err)
	}
	if _, err := os.OpenFile(cfg, os.O_WRONLY, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("write open of a sealed file: %v, want EPERM", err)
	}
	if err := os.Truncate(cfg, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate of a sealed file: %v, want EPERM", err)
	}

	// Fill the volume: the write comes up short, then ENOSPC, and what was
	// written stays.
	f, err := os.Create(filepath.Join(target, "big"))
	if err != nil {
		t.Fatal(err)
	}
	chunk := bytes.Repeat([]byte("x"), 64<<10)
	written := 0
	for written < 4<<20 {
		n, err := f.Write(chunk)
		written += n
		if err != nil {
			if !errors.Is(err, syscall.ENOSPC) {
				t.Fatalf("write: %v, want ENOSPC", err)
			}
			break
		}
	}
	f.Close()
	if written >= 4<<20 || written < 1<<20 {
		t.Fatalf("wrote %d bytes into a 2 MiB volume", written)
	}
	if fi, err := os.Stat(filepath.Join(target, "big")); err != nil || fi.Size() != int64(written) {
		t.Errorf("big: size %v, %v; want %d", fi.Size(), err, written)
	}

	// df, NodeGetVolumeStats and the metrics report the same numbers.
	var sfs unix.Statfs_t
	if err := unix.Statfs(target, &sfs); err != nil {
		t.Fatal(err)
	}
	bs := uint64(sfs.Bsize)
	dfTotal, dfUsed, dfAvail := sfs.Blocks*bs, (sfs.Blocks-sfs.Bfree)*bs, sfs.Bavail*bs
	if dfTotal != 2<<20 || sfs.Files != 100 {
		t.Errorf("df: %d bytes, %d inodes; want 2 MiB and 100", dfTotal, sfs.Files)
	}
	resp, err := env.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: id, VolumePath: target})
	if err != nil {
		t.Fatal(err)
	}
	var b, in *csi.VolumeUsage
	for _, u := range resp.Usage {
		switch u.Unit {
		case csi.VolumeUsage_BYTES:
			b = u
		case csi.VolumeUsage_INODES:
			in = u
		}
	}
	if b == nil || in == nil {
		t.Fatalf("stats = %v", resp)
	}
	if uint64(b.Total) != dfTotal || uint64(b.Used) != dfUsed || uint64(b.Available) != dfAvail {
		t.Errorf("stats bytes %d/%d/%d, df %d/%d/%d", b.Total, b.Used, b.Available, dfTotal, dfUsed, dfAvail)
	}
	if uint64(in.Total) != sfs.Files || uint64(in.Used) != sfs.Files-sfs.Ffree || uint64(in.Available) != sfs.Ffree {
		t.Errorf("stats inodes %d/%d/%d, df %d/%d/%d", in.Total, in.Used, in.Available, sfs.Files, sfs.Files-sfs.Ffree, sfs.Ffree)
	}
	text := scrape(t, env.metrics)
	vl := `volume_id="` + id + `"`
	for _, c := range []struct {
		name string
		want float64
	}{
		{"csi_memfs_volume_used_bytes", float64(dfUsed)},
		{"csi_memfs_volume_limit_bytes", float64(dfTotal)},
		{"csi_memfs_volume_inodes_used", float64(in.Used)},
		{"csi_memfs_volume_inodes_limit", 100},
		{"csi_memfs_volume_copied_up_bytes", 0},
		{"csi_memfs_volume_seal_violations_total", 2},
		{"csi_memfs_seal_violations_total", 2},
		{"csi_memfs_node_used_bytes", float64(dfUsed)},
		{"csi_memfs_node_reserved_bytes", 2 << 20},
		{`csi_memfs_node_volumes{state="published"}`, 1},
	} {
		v, ok := metricValue(text, c.name, vl, `pod_namespace="default"`, `pod_name="pod-1"`)
		if strings.HasPrefix(c.name, "csi_memfs_node") || c.name == "csi_memfs_seal_violations_total" {
			v, ok = metricValue(text, c.name)
		}
		if !ok || v != c.want {
			t.Errorf("%s = %v (found %v), want %v", c.name, v, ok, c.want)
		}
	}
	if v, ok := metricValue(text, "csi_memfs_csi_operations_total", `method="NodePublishVolume"`, `code="OK"`); !ok || v != 1 {
		t.Errorf("publish count = %v, %v", v, ok)
	}
	if v, ok := metricValue(text, "csi_memfs_fuse_operation_duration_seconds_count", `op="CREATE"`); !ok || v < 1 {
		t.Errorf("FUSE CREATE count = %v, %v", v, ok)
	}
	if v, ok := metricValue(text, "csi_memfs_fuse_operation_errors_total", `errno="EPERM"`); !ok || v < 1 {
		t.Errorf("FUSE EPERM count = %v, %v", v, ok)
	}

	// Unpublish: the series go, the seal violations stay in the node total.
	env.unpublish(t, id, target)
	text = scrape(t, env.metrics)
	if _, ok := metricValue(text, "csi_memfs_volume_used_bytes", vl); ok {
		t.Errorf("series of an unpublished volume remain")
	}
	if v, _ := metricValue(text, "csi_memfs_seal_violations_total"); v != 2 {
		t.Errorf("node seal violations after unpublish = %v, want 2", v)
	}
	if _, err := os.Stat(target); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("target after unpublish: %v, want it removed", err)
	}
}

// TestPublishModes covers readonly, volume_mount_group and re-publish.
func TestPublishModes(t *testing.T) {
	env := startDriver(t, nil)
	ctx := context.Background()

	ro := env.target(t, "ro")
	r := pubReq("ro", ro, attrs())
	r.Readonly = true
	if _, err := env.node.NodePublishVolume(ctx, r); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(ro, "x"), nil, 0o644); !errors.Is(err, syscall.EROFS) {
		t.Errorf("write into a readonly volume: %v, want EROFS", err)
	}

	grp := env.target(t, "grp")
	r = pubReq("grp", grp, attrs())
	r.VolumeCapability.GetMount().VolumeMountGroup = "3000"
	if _, err := env.node.NodePublishVolume(ctx, r); err != nil {
		t.Fatal(err)
	}
	var st unix.Stat_t
	if err := unix.Stat(grp, &st); err != nil || st.Gid != 3000 || st.Mode&0o7777 != 0o2775 {
		t.Errorf("root: gid %d mode %o, %v; want gid 3000 mode 2775", st.Gid, st.Mode&0o7777, err)
	}
	// A pod user in the fsGroup writes; the file inherits the group.
	runAs(t, 1000, 1000, []uint32{3000}, "mkdir "+grp+"/d && echo x >"+grp+"/d/f")
	if err := unix.Stat(filepath.Join(grp, "d", "f"), &st); err != nil || st.Gid != 3000 {
		t.Errorf("file: gid %d, %v; want 3000", st.Gid, err)
	}
	// Another user is refused.
	if err := runAsErr(1001, 1001, nil, "echo x >"+grp+"/g"); err == nil {
		t.Errorf("a user outside the mount group wrote into the volume")
	}
}

// runAs runs a shell command as uid:gid with supplementary groups, failing
// the test if it fails.
func runAs(t *testing.T, uid, gid uint32, groups []uint32, script string) {
	t.Helper()
	if err := runAsErr(uid, gid, groups, script); err != nil {
		t.Fatalf("as %d:%d: %s: %v", uid, gid, script, err)
	}
}

func runAsErr(uid, gid uint32, groups []uint32, script string) error {
	cmd := exec.Command("/bin/sh", "-c", script)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: groups}}
	out, err := cmd.CombinedOutput()
	if err != nil {
		return errors.New(err.Error() + ": " + strconv.Quote(string(out)))
	}
	return nil
}
