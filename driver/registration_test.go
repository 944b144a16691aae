package driver

import (
	"context"
	"os"
	"path/filepath"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/csi-memfs/csi-memfs/handoff"
	"github.com/csi-memfs/csi-memfs/internal/sockettest"
	"github.com/csi-memfs/csi-memfs/registrar"
)

// TestRunRegistersWithKubelet: with KubeletRegistrationPath set, Run serves
// the registration socket once the CSI socket listens, answering GetInfo
// with the path kubelet must dial, and reports kubelet's verdicts in its
// metrics.
func TestRunRegistersWithKubelet(t *testing.T) {
	regDir := t.TempDir()
	env := startDriver(t, func(c *Config) {
		c.KubeletRegistrationPath = "/var/lib/kubelet/plugins/memfs.csi.dev/csi.sock"
		c.RegistrationDir = regDir
		c.registrationRetry = 10 * time.Millisecond
	})
	sock := filepath.Join(regDir, registrar.SocketName(env.cfg.DriverName))
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, err := os.Stat(sock); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no registration socket at %s", sock)
		}
		time.Sleep(10 * time.Millisecond)
	}
	conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	info, err := registerapi.NewRegistrationClient(conn).GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if got, want := info.GetEndpoint(), "/var/lib/kubelet/plugins/memfs.csi.dev/csi.sock"; got != want {
		t.Errorf("endpoint %q, want %q", got, want)
	}
	if got, want := info.GetName(), env.cfg.DriverName; got != want {
		t.Errorf("name %q, want %q", got, want)
	}

	// kubelet's verdicts show in the metrics.
	before := handoff.StampAt(sock)
	if _, err := registerapi.NewRegistrationClient(conn).NotifyRegistrationStatus(context.Background(),
		&registerapi.RegistrationStatus{PluginRegistered: false, Error: "NodeGetInfo failed"}); err != nil {
		t.Fatal(err)
	}
	text := scrape(t, env.metrics)
	if v, ok := metricValue(text, "csi_memfs_kubelet_registered"); !ok || v != 0 {
		t.Errorf("csi_memfs_kubelet_registered after a refusal = %v (%v), want 0", v, ok)
	}
	if v, _ := metricValue(text, "csi_memfs_kubelet_registrations_total", `result="refused"`); v != 1 {
		t.Errorf("refused registrations = %v, want 1", v)
	}
	// The refusal brings a new socket; kubelet accepts that one.
	sockettest.WaitNewSocket(t, sock, before)
	conn2, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn2.Close()
	if _, err := registerapi.NewRegistrationClient(conn2).NotifyRegistrationStatus(context.Background(),
		&registerapi.RegistrationStatus{PluginRegistered: true}); err != nil {
		t.Fatal(err)
	}
	text = scrape(t, env.metrics)
	if v, _ := metricValue(text, "csi_memfs_kubelet_registered"); v != 1 {
		t.Errorf("csi_memfs_kubelet_registered after acceptance = %v, want 1", v)
	}
	if v, _ := metricValue(text, "csi_memfs_kubelet_registrations_total", `result="accepted"`); v != 1 {
		t.Errorf("accepted registrations = %v, want 1", v)
	}
}
