package driver

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
)

// requireFUSE skips tests that mount unless we are root with /dev/fuse.
func requireFUSE(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts tmpfs and FUSE)")
	}
	if err := fuseUsable(); err != nil {
		t.Skipf("needs FUSE: %v", err)
	}
}

// testEnv is a driver served in this process over a real unix socket.
type testEnv struct {
	root    string // everything the test creates lives under root
	d       *Driver
	cfg     Config
	conn    *grpc.ClientConn
	node    csi.NodeClient
	ident   csi.IdentityClient
	metrics string // base URL of /metrics and /healthz
}

// startDriver runs a Driver on a socket under a fresh directory. Cleanup
// unpublishes every volume still published, stops the driver and checks
// nothing stays mounted.
func startDriver(t testing.TB, mutate func(*Config)) *testEnv {
	t.Helper()
	requireFUSE(t)
	root := t.TempDir()
	// Pod users (other uids) must reach the target paths, as under
	// /var/lib/kubelet/pods.
	os.Chmod(filepath.Dir(root), 0o755)
	os.Chmod(root, 0o755)
	cfg := Config{
		NodeID:            "test-node",
		Version:           "test",
		Endpoint:          "unix://" + filepath.Join(root, "csi.sock"),
		StateDir:          filepath.Join(root, "state"),
		KubeletDir:        root,
		MetricsAddress:    freeAddr(t),
		DefaultVolumeSize: 8 << 20,
		imageNoSync:       true,
		// The test registries are on loopback, over plain HTTP.
		InsecureRegistries: []string{"127.0.0.1"},
	}
	if mutate != nil {
		mutate(&cfg)
	}
	d, err := New(cfg)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- d.Run(ctx) }()
	conn := dial(t, cfg.Endpoint)
	env := &testEnv{root: root, d: d, cfg: d.cfg, conn: conn, node: csi.NewNodeClient(conn),
		ident: csi.NewIdentityClient(conn), metrics: "http://" + cfg.MetricsAddress}
	t.Cleanup(func() {
		for _, v := range d.vols.snapshot() {
			if _, err := env.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{
				VolumeId: v.id(), TargetPath: v.rec.Spec.TargetPath}); err != nil {
				t.Errorf("cleanup: unpublish %s: %v", v.id(), err)
			}
		}
		conn.Close()
		cancel()
		if err := <-done; err != nil {
			t.Errorf("Run: %v", err)
		}
		if err := d.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
		if m := mountsUnder(t, root); len(m) > 0 {
			t.Errorf("mounts left under %s: %v", root, m)
			for _, p := range m {
				unix.Unmount(p, unix.MNT_DETACH)
			}
		}
	})
	return env
}

// dial connects to a CSI endpoint and waits until it answers.
func dial(t testing.TB, endpoint string) *grpc.ClientConn {
	t.Helper()
	conn, err := grpc.NewClient(endpoint, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatalf("dial %s: %v", endpoint, err)
	}
	ident := csi.NewIdentityClient(conn)
	deadline := time.Now().Add(20 * time.Second)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), time.Second)
		_, err := ident.Probe(ctx, &csi.ProbeRequest{})
		cancel()
		if err == nil {
			return conn
		}
		if time.Now().After(deadline) {
			conn.Close()
			t.Fatalf("plugin at %s does not answer: %v", endpoint, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// freeAddr returns a loopback address with a free port.
func freeAddr(t testing.TB) string {
	t.Helper()
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	return l.Addr().String()
}

// attrs returns the volume attributes kubelet sends for an inline volume of
// pod default/pod-1, plus kv (key, value, ...).
func attrs(kv ...string) map[string]string {
	m := map[string]string{
		attrEphemeral:                         "true",
		attrPodNS:                             "default",
		attrPodName:                           "pod-1",
		attrPodUID:                            "0b1c2d3e-0000-4000-8000-000000000001",
		kubeletPrefix + "serviceAccount.name": "default",
	}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return m
}

// mountCap is a mount capability with access mode m.
func mountCap(m csi.VolumeCapability_AccessMode_Mode) *csi.VolumeCapability {
	return &csi.VolumeCapability{
		AccessType: &csi.VolumeCapability_Mount{Mount: &csi.VolumeCapability_MountVolume{}},
		AccessMode: &csi.VolumeCapability_AccessMode{Mode: m},
	}
}

// pubReq is a publish of an inline volume as kubelet makes it.
func pubReq(id, target string, a map[string]string) *csi.NodePublishVolumeRequest {
	return &csi.NodePublishVolumeRequest{
		VolumeId:         id,
		TargetPath:       target,
		VolumeCapability: mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER),
		VolumeContext:    a,
	}
}

// target returns a fresh target path under env.root whose parent exists,
// as kubelet prepares it.
func (env *testEnv) target(t testing.TB, name string) string {
	t.Helper()
	parent := filepath.Join(env.root, "pods", name)
	if err := os.MkdirAll(parent, 0o755); err != nil {
		t.Fatal(err)
	}
	return filepath.Join(parent, "mount")
}

// publish publishes volume id at a fresh target and returns the target.
func (env *testEnv) publish(t testing.TB, id string, a map[string]string) string {
	t.Helper()
	target := env.target(t, id)
	if _, err := env.node.NodePublishVolume(context.Background(), pubReq(id, target, a)); err != nil {
		t.Fatalf("publish %s: %v", id, err)
	}
	return target
}

func (env *testEnv) unpublish(t testing.TB, id, target string) {
	t.Helper()
	if _, err := env.node.NodeUnpublishVolume(context.Background(), &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
		t.Fatalf("unpublish %s: %v", id, err)
	}
}

// mountsUnder lists the mount points at or below dir.
func mountsUnder(t testing.TB, dir string) []string {
	t.Helper()
	f, err := os.Open("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	var out []string
	s := bufio.NewScanner(f)
	for s.Scan() {
		fields := strings.Fields(s.Text())
		if len(fields) < 5 {
			continue
		}
		mp := unescapeMount(fields[4])
		if mp == dir || strings.HasPrefix(mp, dir+"/") {
			out = append(out, mp)
		}
	}
	return out
}

// unescapeMount undoes mountinfo's octal escapes (\040 for a space).
func unescapeMount(s string) string {
	var b strings.Builder
	for i := 0; i < len(s); i++ {
		if s[i] == '\\' && i+3 < len(s) {
			if n, err := strconv.ParseUint(s[i+1:i+4], 8, 8); err == nil {
				b.WriteByte(byte(n))
				i += 3
				continue
			}
		}
		b.WriteByte(s[i])
	}
	return b.String()
}

// scrape returns the metrics text at base/metrics.
func scrape(t testing.TB, base string) string {
	t.Helper()
	text, err := tryScrape(base)
	if err != nil {
		t.Fatalf("scrape: %v", err)
	}
	return text
}

// tryScrape is scrape, returning the error.
func tryScrape(base string) (string, error) {
	resp, err := http.Get(base + "/metrics")
	if err != nil {
		return "", err
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err == nil && resp.StatusCode != 200 {
		err = fmt.Errorf("status %d", resp.StatusCode)
	}
	return string(b), err
}

// metricValue finds the sample of name whose labels include every
// label="value" in labels, and returns its value; ok is false when absent.
func metricValue(text, name string, labels ...string) (v float64, ok bool) {
	for _, line := range strings.Split(text, "\n") {
		if !strings.HasPrefix(line, name+"{") && !strings.HasPrefix(line, name+" ") {
			continue
		}
		match := true
		for _, l := range labels {
			if !strings.Contains(line, l) {
				match = false
			}
		}
		if !match {
			continue
		}
		f := strings.Fields(line)
		v, err := strconv.ParseFloat(f[len(f)-1], 64)
		return v, err == nil
	}
	return 0, false
}

var (
	binOnce sync.Once
	binPath string
	binErr  error
	binDir  string
)

// serveBinary builds cmd/csi-memfs once per test run and returns its path.
func serveBinary(t testing.TB) string {
	t.Helper()
	binOnce.Do(func() {
		binDir, binErr = os.MkdirTemp("", "csi-memfs-bin-")
		if binErr != nil {
			return
		}
		binPath = filepath.Join(binDir, "csi-memfs")
		out, err := exec.Command("go", "build", "-o", binPath, "../cmd/csi-memfs").CombinedOutput()
		if err != nil {
			binErr = fmt.Errorf("go build ../cmd/csi-memfs: %v\n%s", err, out)
		}
	})
	if binErr != nil {
		t.Fatal(binErr)
	}
	return binPath
}

// serveProc is a `csi-memfs serve` process.
type serveProc struct {
	cmd      *exec.Cmd
	endpoint string
	metrics  string
	log      *os.File
}

// startServe starts the real binary on a socket under root with state in
// root/state, and waits until it answers Probe.
func startServe(t testing.TB, root string, extra ...string) *serveProc {
	t.Helper()
	bin := serveBinary(t)
	p := &serveProc{endpoint: "unix://" + filepath.Join(root, "csi.sock"), metrics: freeAddr(t)}
	logf, err := os.OpenFile(filepath.Join(root, "serve.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	p.log = logf
	args := append([]string{"serve", "--endpoint", p.endpoint, "--node-id", "sanity-node",
		"--state-dir", filepath.Join(root, "state"), "--kubelet-dir", root, "--metrics-address", p.metrics, "-v", "5",
		// The test registries are on loopback, over plain HTTP.
		"--insecure-registry", "127.0.0.1"}, extra...)
	p.cmd = exec.Command(bin, args...)
	p.cmd.Stdout, p.cmd.Stderr = logf, logf
	if err := p.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if p.cmd.ProcessState == nil {
			p.cmd.Process.Signal(unix.SIGTERM)
			p.cmd.Wait()
		}
		logf.Close()
		if t.Failed() {
			b, _ := os.ReadFile(logf.Name())
			t.Logf("serve log:\n%s", tail(string(b), 60))
		}
	})
	conn := dial(t, p.endpoint)
	conn.Close()
	return p
}

// tail returns the last n lines of s.
func tail(s string, n int) string {
	lines := strings.Split(s, "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func TestMain(m *testing.M) {
	code := m.Run()
	if binDir != "" {
		os.RemoveAll(binDir)
	}
	os.Exit(code)
}
