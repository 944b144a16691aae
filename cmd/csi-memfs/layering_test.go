package main

import (
	"os/exec"
	"strings"
	"testing"
)

// TestLayering keeps the imports of DESIGN.md pointing down: memfs and
// overlay know nothing of FUSE, gRPC or Kubernetes; only fusefs speaks FUSE;
// only volume assembles memfs, overlay and fusefs; the command reaches them
// through driver and volume.
func TestLayering(t *testing.T) {
	const mod = "github.com/csi-memfs/csi-memfs/"
	fuse := "github.com/hanwen/go-fuse"
	rules := []struct {
		pkg       string
		forbidden []string
	}{
		{"memfs", []string{fuse, "google.golang.org/grpc", "k8s.io/", "github.com/container-storage-interface", "github.com/prometheus", mod + "fusefs", mod + "overlay", mod + "driver", mod + "image"}},
		{"overlay", []string{fuse, "google.golang.org/grpc", "k8s.io/", "github.com/container-storage-interface", "github.com/prometheus", mod + "fusefs", mod + "driver", mod + "image"}},
		{"fusefs", []string{"google.golang.org/grpc", "github.com/container-storage-interface", "github.com/prometheus", mod + "driver", mod + "image"}},
		{"image", []string{fuse, mod + "fusefs", mod + "driver", "github.com/prometheus"}},
		{"volume", []string{"google.golang.org/grpc", "github.com/container-storage-interface", "github.com/prometheus", mod + "driver", mod + "image", mod + "registrar"}},
		{"registrar", []string{fuse, mod + "driver", mod + "volume", mod + "image", mod + "fusefs", mod + "overlay", mod + "memfs"}},
	}
	out, err := exec.Command("go", "list", "-f", "{{.ImportPath}} {{join .Imports \" \"}}", mod+"...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	exists := map[string]bool{}
	for _, line := range lines {
		exists[strings.Fields(line)[0]] = true
	}
	for _, r := range rules {
		if !exists[mod+r.pkg] {
			continue
		}
		out, err := exec.Command("go", "list", "-deps", mod+r.pkg).CombinedOutput()
		if err != nil {
			t.Fatalf("go list %s: %v\n%s", r.pkg, err, out)
		}
		for _, dep := range strings.Fields(string(out)) {
			for _, f := range r.forbidden {
				if strings.HasPrefix(dep, f) {
					t.Errorf("%s imports %s (directly or not): imports must point down", r.pkg, dep)
				}
			}
		}
	}

	// fusefs is the one place that speaks FUSE. volume alone assembles
	// memfs, overlay and fusefs (the holder's fallback, fusefs.Refuse,
	// aside).
	direct := map[string][]string{
		mod + "driver":        {mod + "memfs", mod + "overlay", mod + "fusefs"},
		mod + "cmd/csi-memfs": {mod + "memfs", mod + "overlay", mod + "image"},
	}
	for _, line := range lines {
		f := strings.Fields(line)
		for _, imp := range f[1:] {
			if strings.HasPrefix(imp, fuse) && f[0] != mod+"fusefs" {
				t.Errorf("%s imports %s: only fusefs may import go-fuse", f[0], imp)
			}
			for _, no := range direct[f[0]] {
				if imp == no {
					t.Errorf("%s imports %s: volumes are built by package volume", f[0], imp)
				}
			}
		}
	}
}
