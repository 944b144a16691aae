package registrar

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials/insecure"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/csi-memfs/csi-memfs/handoff"
	"github.com/csi-memfs/csi-memfs/internal/sockettest"
)

// startRegistration serves cfg (SocketPath defaulted into a temporary
// plugins_registry directory) and returns a client dialed over the real unix
// socket, as kubelet's plugin watcher dials it, and a stop function that
// returns Serve's result.
func startRegistration(t *testing.T, cfg Config) (registerapi.RegistrationClient, func() error) {
	t.Helper()
	if cfg.SocketPath == "" {
		cfg.SocketPath = filepath.Join(t.TempDir(), "plugins_registry", SocketName(cfg.DriverName))
	}
	ctx, cancel := context.WithCancel(context.Background())
	errc := make(chan error, 1)
	go func() { errc <- Serve(ctx, cfg) }()
	waitForSocket(t, cfg.SocketPath, errc)

	conn, err := grpc.NewClient("unix://"+cfg.SocketPath, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	var stopped bool
	stop := func() error {
		stopped = true
		conn.Close()
		cancel()
		select {
		case err := <-errc:
			return err
		case <-time.After(10 * time.Second):
			t.Fatal("Serve did not return after its context was cancelled")
			return nil
		}
	}
	t.Cleanup(func() {
		if !stopped {
			stop()
		}
	})
	return registerapi.NewRegistrationClient(conn), stop
}

// waitForSocket waits until something listens on path.
func waitForSocket(t *testing.T, path string, errc chan error) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for time.Now().Before(deadline) {
		select {
		case err := <-errc:
			t.Fatalf("Serve returned early: %v", err)
		default:
		}
		if c, err := net.Dial("unix", path); err == nil {
			c.Close()
			return
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Fatalf("no listener on %s", path)
}

func TestRegistrationGetInfo(t *testing.T) {
	const endpoint = "/var/lib/kubelet/plugins/memfs.csi.dev/csi.sock"
	client, _ := startRegistration(t, Config{DriverName: "memfs.csi.dev", KubeletEndpoint: endpoint})

	info, err := client.GetInfo(context.Background(), &registerapi.InfoRequest{})
	if err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if got, want := info.GetType(), registerapi.CSIPlugin; got != want {
		t.Errorf("type = %q, want %q", got, want)
	}
	if got, want := info.GetName(), "memfs.csi.dev"; got != want {
		t.Errorf("name = %q, want %q", got, want)
	}
	if got, want := info.GetEndpoint(), endpoint; got != want {
		t.Errorf("endpoint = %q, want %q", got, want)
	}
	if got, want := info.GetSupportedVersions(), []string{"1.0.0"}; !slices.Equal(got, want) {
		t.Errorf("supported versions = %q, want %q", got, want)
	}
}

func TestRegistrationNotifyStatus(t *testing.T) {
	type status struct {
		registered bool
		message    string
	}
	got := make(chan status, 2)
	client, _ := startRegistration(t, Config{
		DriverName:      "memfs.csi.dev",
		KubeletEndpoint: "/var/lib/kubelet/plugins/memfs.csi.dev/csi.sock",
		OnStatus:        func(r bool, m string) { got <- status{r, m} },
	})
	for _, want := range []status{{true, ""}, {false, "plugin version not supported"}} {
		_, err := client.NotifyRegistrationStatus(context.Background(),
			&registerapi.RegistrationStatus{PluginRegistered: want.registered, Error: want.message})
		if err != nil {
			t.Fatalf("NotifyRegistrationStatus(%+v): %v", want, err)
		}
		if s := <-got; s != want {
			t.Errorf("OnStatus got %+v, want %+v", s, want)
		}
	}
}

func TestRegistrationStopRemovesSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), SocketName("memfs.csi.dev"))
	client, stop := startRegistration(t, Config{
		DriverName: "memfs.csi.dev", KubeletEndpoint: "/csi/csi.sock", SocketPath: sock})
	if _, err := client.GetInfo(context.Background(), &registerapi.InfoRequest{}); err != nil {
		t.Fatalf("GetInfo: %v", err)
	}
	if err := stop(); err != nil {
		t.Fatalf("Serve after cancel = %v, want nil", err)
	}
	if _, err := os.Lstat(sock); !os.IsNotExist(err) {
		t.Errorf("socket still there after stop (lstat: %v); kubelet would keep the plugin registered", err)
	}
}

func TestRegistrationReplacesStaleSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), SocketName("memfs.csi.dev"))
	// A socket file nobody listens on, as a killed process leaves it.
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	l.(*net.UnixListener).SetUnlinkOnClose(false)
	l.Close()
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("stale socket not left behind: %v", err)
	}

	client, _ := startRegistration(t, Config{
		DriverName: "memfs.csi.dev", KubeletEndpoint: "/csi/csi.sock", SocketPath: sock})
	if _, err := client.GetInfo(context.Background(), &registerapi.InfoRequest{}); err != nil {
		t.Fatalf("GetInfo over the replaced socket: %v", err)
	}
}

func TestRegistrationBadConfig(t *testing.T) {
	dir := t.TempDir()
	notSocket := filepath.Join(dir, "file")
	if err := os.WriteFile(notSocket, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		cfg  Config
		want string
	}{
		{"no driver name", Config{KubeletEndpoint: "/csi.sock", SocketPath: dir + "/r.sock"}, "driver name"},
		{"relative endpoint", Config{DriverName: "d", KubeletEndpoint: "csi.sock", SocketPath: dir + "/r.sock"}, "--kubelet-registration-path"},
		{"no socket path", Config{DriverName: "d", KubeletEndpoint: "/csi.sock"}, "--registration-dir"},
		{"not a socket", Config{DriverName: "d", KubeletEndpoint: "/csi.sock", SocketPath: notSocket}, "not a socket"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
			defer cancel()
			err := Serve(ctx, tc.cfg)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("Serve = %v, want an error containing %q", err, tc.want)
			}
		})
	}
	if b, err := os.ReadFile(notSocket); err != nil || string(b) != "x" {
		t.Errorf("a regular file at the socket path was changed: %q, %v", b, err)
	}
}

// TestRegistrationSuccessorKeepsSocket: during a rollout the successor
// binds the socket path anew while the predecessor still serves; the
// predecessor stopping must leave the successor's socket in place, or
// kubelet unregisters the driver for good.
func TestRegistrationSuccessorKeepsSocket(t *testing.T) {
	sock := filepath.Join(t.TempDir(), SocketName("memfs.csi.dev"))
	cfg := Config{DriverName: "memfs.csi.dev", KubeletEndpoint: "/csi/csi.sock", SocketPath: sock}
	_, stopOld := startRegistration(t, cfg)
	before := handoff.StampAt(sock)
	client, _ := startRegistration(t, cfg)
	sockettest.WaitNewSocket(t, sock, before)
	if err := stopOld(); err != nil {
		t.Fatalf("stopping the predecessor: %v", err)
	}
	if _, err := os.Lstat(sock); err != nil {
		t.Fatalf("the predecessor removed the successor's socket: %v", err)
	}
	if _, err := client.GetInfo(context.Background(), &registerapi.InfoRequest{}); err != nil {
		t.Fatalf("GetInfo over the successor's socket: %v", err)
	}
}

// startQuickRegistration serves the registration with the timings quick
// sets (to 10 ms), and returns its socket's path.
func startQuickRegistration(t *testing.T, quick func(*Config, time.Duration)) string {
	t.Helper()
	sock := filepath.Join(t.TempDir(), SocketName("memfs.csi.dev"))
	cfg := Config{DriverName: "memfs.csi.dev", KubeletEndpoint: "/csi/csi.sock", SocketPath: sock}
	quick(&cfg, 10*time.Millisecond)
	startRegistration(t, cfg)
	return sock
}

// TestRegistrationOfferedAgainAfterRefusal: kubelet never retries a socket
// whose registration it refused, so a refusal brings a new socket (a new
// registration attempt), as node-driver-registrar's restart does.
func TestRegistrationOfferedAgainAfterRefusal(t *testing.T) {
	sock := startQuickRegistration(t, func(c *Config, d time.Duration) { c.Retry = d })
	// notify reports a status as kubelet does: over a connection of its
	// own to the socket there now.
	notify := func(st *registerapi.RegistrationStatus) {
		t.Helper()
		conn, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
		defer cancel()
		if _, err := registerapi.NewRegistrationClient(conn).NotifyRegistrationStatus(ctx, st); err != nil {
			t.Fatalf("NotifyRegistrationStatus(%v): %v", st, err)
		}
	}
	for range 2 {
		before := handoff.StampAt(sock)
		notify(&registerapi.RegistrationStatus{PluginRegistered: false, Error: "NodeGetInfo failed"})
		sockettest.WaitNewSocket(t, sock, before)
	}
	// An accepted registration is not offered again.
	before := handoff.StampAt(sock)
	notify(&registerapi.RegistrationStatus{PluginRegistered: true})
	time.Sleep(100 * time.Millisecond)
	if handoff.StampAt(sock) != before {
		t.Error("the socket was replaced after kubelet accepted the registration")
	}
}

// TestRegistrationSocketRestored: a registration socket removed from under
// the plugin (a cleanup of kubelet's directory) is put back; one replaced by
// another process's is left alone.
func TestRegistrationSocketRestored(t *testing.T) {
	sock := startQuickRegistration(t, func(c *Config, d time.Duration) { c.CheckPeriod = d })
	before := handoff.StampAt(sock)
	if err := os.Remove(sock); err != nil {
		t.Fatal(err)
	}
	sockettest.WaitNewSocket(t, sock, before)

	// Another process's socket at the path stays.
	os.Remove(sock)
	l, err := net.Listen("unix", sock)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	theirs := handoff.StampAt(sock)
	time.Sleep(100 * time.Millisecond)
	if handoff.StampAt(sock) != theirs {
		t.Error("another process's registration socket was replaced")
	}
}
