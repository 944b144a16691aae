package main

import (
	"bytes"
	"encoding/json"
	"errors"
	"io/fs"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/csi-memfs/csi-memfs/driver"
)

func TestPrintVolumes(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	vols := []driver.VolumeInfo{
		{ID: "csi-1", PodNamespace: "team", PodName: "web-0", Image: "registry.local/site:v3",
			PublishedAt: now.Add(-90 * time.Minute), State: "published", BytesUsed: 3 << 20, BytesLimit: 256 << 20,
			InodesUsed: 12, InodesLimit: 65536, Seal: []string{"etc/*.yaml"}, SealViolations: 2},
		{ID: "csi-2", PublishedAt: now.Add(-30 * time.Second), State: "lost", BytesUsed: 512, BytesLimit: 1536 << 10,
			InodesUsed: 1, InodesLimit: 1024},
		{ID: "csi-3", PublishedAt: now.Add(-2 * time.Minute), State: "published", BytesUsed: 0, BytesLimit: 1 << 20,
			InodesUsed: 1, InodesLimit: 1024, Degraded: []string{"no_passthrough", "no_resend"}},
	}
	var out bytes.Buffer
	printVolumes(&out, vols, now)
	want := []string{
		"VOLUME  POD         IMAGE                   USED  LIMIT  INODES    SEALS                   AGE  STATE",
		"csi-1   team/web-0  registry.local/site:v3  3Mi   256Mi  12/65536  etc/*.yaml (2 refused)  1h   published",
		"csi-2   -           -                       512   1.5Mi  1/1024    -                       30s  lost",
		"csi-3   -           -                       0     1Mi    1/1024    -                       2m   published DEGRADED(no_passthrough,no_resend)",
	}
	if got := strings.Split(strings.TrimSpace(out.String()), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestFetchVolumes(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/volumes" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode([]driver.VolumeInfo{{ID: "csi-1", State: "published"}})
	}))
	defer srv.Close()
	vols, _, err := fetchVolumes(strings.TrimPrefix(srv.URL, "http://"))
	if err != nil || len(vols) != 1 || vols[0].ID != "csi-1" {
		t.Errorf("fetch: %+v, %v", vols, err)
	}
	srv.Close()
	if _, _, err := fetchVolumes(strings.TrimPrefix(srv.URL, "http://")); err == nil || !strings.Contains(err.Error(), "is the plugin running") {
		t.Errorf("fetch from a stopped plugin: %v", err)
	}
}

// TestVolumesFindsServe runs the built command: serve on a port of its
// choosing records it in its state directory, and volumes finds it there
// by --state-dir alone, or by --metrics-address (or the deprecated
// --address) given the address; the file goes when serve stops.
func TestVolumesFindsServe(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	bin := filepath.Join(t.TempDir(), "csi-memfs")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	root := t.TempDir()
	state := filepath.Join(root, "state")
	var serveLog bytes.Buffer
	srv := exec.Command(bin, "serve", "--node-id", "n1", "--endpoint", "unix://"+filepath.Join(root, "csi.sock"),
		"--state-dir", state, "--kubelet-dir", root, "--metrics-address", "127.0.0.1:0")
	srv.Stdout, srv.Stderr = &serveLog, &serveLog
	if err := srv.Start(); err != nil {
		t.Fatal(err)
	}
	stopped := false
	stop := func() {
		if !stopped {
			stopped = true
			srv.Process.Signal(syscall.SIGTERM)
			srv.Wait()
		}
	}
	defer func() {
		stop()
		if t.Failed() {
			t.Logf("serve log:\n%s", serveLog.String())
		}
	}()
	var addr string
	for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(50 * time.Millisecond) {
		var err error
		if addr, err = driver.ReadMetricsAddress(state); err == nil {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("no %s after 30s: %v", driver.MetricsAddressFile, err)
		}
	}
	if addr == "127.0.0.1:0" || !strings.HasPrefix(addr, "127.0.0.1:") {
		t.Fatalf("recorded address %q, want the port serve listens on", addr)
	}
	volumes := func(args ...string) (string, error) {
		var stdout, stderr bytes.Buffer
		cmd := exec.Command(bin, append([]string{"volumes"}, args...)...)
		cmd.Stdout, cmd.Stderr = &stdout, &stderr
		err := cmd.Run()
		return stdout.String() + stderr.String(), err
	}
	for _, args := range [][]string{
		{"--state-dir", state},
		{"--metrics-address", addr, "--state-dir", t.TempDir()},
		{"--address", addr, "--state-dir", t.TempDir()},
	} {
		if out, err := volumes(args...); err != nil || !strings.HasPrefix(out, "VOLUME") {
			t.Errorf("volumes %q: %v, printed %q", args, err, out)
		}
	}
	// Not found by default: the hint names the flags volumes has.
	empty := t.TempDir()
	if got := volumesAddress(empty); got != defaultVolumesAddress {
		t.Errorf("volumesAddress(no file) = %q, want %q", got, defaultVolumesAddress)
	}
	stop()
	if _, err := os.Stat(filepath.Join(state, driver.MetricsAddressFile)); !errors.Is(err, fs.ErrNotExist) {
		t.Errorf("%s after serve stopped: %v", driver.MetricsAddressFile, err)
	}
	out, err := volumes("--metrics-address", addr)
	if err == nil || !strings.Contains(out, "--metrics-address") || strings.Contains(out, "flag provided but not defined") {
		t.Errorf("volumes with serve stopped: %v, printed %q", err, out)
	}
}
