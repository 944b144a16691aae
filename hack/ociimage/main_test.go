package main

import (
	"archive/tar"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

func TestFullName(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"busybox:1", "docker.io/library/busybox:1"},
		{"csi-memfs/csi-memfs:dev", "docker.io/csi-memfs/csi-memfs:dev"},
		{"docker.io/csi-memfs/csi-memfs:e2e", "docker.io/csi-memfs/csi-memfs:e2e"},
		{"registry.k8s.io/pause:3.10", "registry.k8s.io/pause:3.10"},
		{"127.0.0.1:5000/x:y", "127.0.0.1:5000/x:y"},
		{"localhost/x:y", "localhost/x:y"},
	} {
		if got := fullName(tc.in); got != tc.want {
			t.Errorf("fullName(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

// files lists the image's single layer: name -> type flag and link target.
func files(t *testing.T, img v1.Image) map[string]string {
	t.Helper()
	rc := mutate.Extract(img)
	defer rc.Close()
	tr := tar.NewReader(rc)
	got := map[string]string{}
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return got
		}
		if err != nil {
			t.Fatal(err)
		}
		got[h.Name] = string(h.Typeflag) + h.Linkname
	}
}

func TestBuild(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "app")
	if err := os.WriteFile(bin, []byte("#!/bin/sh\n"), 0o755); err != nil {
		t.Fatal(err)
	}
	check := func(t *testing.T, img v1.Image) {
		t.Helper()
		cf, err := img.ConfigFile()
		if err != nil {
			t.Fatal(err)
		}
		if !slices.Equal(cf.Config.Entrypoint, []string{"/app"}) || !slices.Equal(cf.Config.Cmd, []string{"serve"}) || cf.OS != "linux" {
			t.Errorf("config: entrypoint %q cmd %q os %q", cf.Config.Entrypoint, cf.Config.Cmd, cf.OS)
		}
		got := files(t, img)
		for name, want := range map[string]string{
			"app": "0", "bin/busybox": "0", "bin/mount": "2busybox", "bin/umount": "2busybox", "bin/sh": "2busybox", "tmp": "5",
		} {
			if got[name] != want {
				t.Errorf("layer entry %s = %q, want %q (all: %v)", name, got[name], want, got)
			}
		}
	}
	args := []string{"-tag", "csi-memfs/csi-memfs:test", "-file", bin + ":/app", "-busybox", bin,
		"-applets", "sh,mount,umount", "-entrypoint", "/app", "-cmd", "serve"}

	t.Run("oci", func(t *testing.T) {
		out := filepath.Join(dir, "oci.tar")
		if err := run(append([]string{"-o", out}, args...)); err != nil {
			t.Fatal(err)
		}
		unpacked := filepath.Join(dir, "oci")
		os.MkdirAll(unpacked, 0o755)
		if b, err := exec.Command("tar", "-xf", out, "-C", unpacked).CombinedOutput(); err != nil {
			t.Fatalf("tar: %v %s", err, b)
		}
		idx, err := layout.ImageIndexFromPath(unpacked)
		if err != nil {
			t.Fatal(err)
		}
		m, err := idx.IndexManifest()
		if err != nil || len(m.Manifests) != 1 {
			t.Fatalf("index: %v %+v", err, m)
		}
		if got := m.Manifests[0].Annotations["io.containerd.image.name"]; got != "docker.io/csi-memfs/csi-memfs:test" {
			t.Errorf("io.containerd.image.name = %q", got)
		}
		img, err := idx.Image(m.Manifests[0].Digest)
		if err != nil {
			t.Fatal(err)
		}
		check(t, img)

		// The same inputs give the same digest.
		again := filepath.Join(dir, "again.tar")
		if err := run(append([]string{"-o", again}, args...)); err != nil {
			t.Fatal(err)
		}
		a, _ := os.ReadFile(out)
		b, _ := os.ReadFile(again)
		if string(a) != string(b) {
			t.Errorf("two builds of the same inputs differ")
		}
	})
	t.Run("docker", func(t *testing.T) {
		out := filepath.Join(dir, "docker.tar")
		if err := run(append([]string{"-o", out, "-format", "docker"}, args...)); err != nil {
			t.Fatal(err)
		}
		tag, _ := name.NewTag("csi-memfs/csi-memfs:test")
		img, err := tarball.ImageFromPath(out, &tag)
		if err != nil {
			t.Fatal(err)
		}
		check(t, img)
	})
	t.Run("index", func(t *testing.T) {
		for _, arch := range []string{"amd64", "arm64"} {
			if err := os.WriteFile(filepath.Join(dir, "app-"+arch), []byte("#!/bin/sh\n# "+arch+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
		}
		out := filepath.Join(dir, "index.tar")
		if err := run([]string{"-o", out, "-tag", "csi-memfs/csi-memfs:1.2.3", "-platform", "linux/amd64,linux/arm64",
			"-file", filepath.Join(dir, "app-{arch}") + ":/app", "-busybox", filepath.Join(dir, "app-{arch}"),
			"-applets", "sh,mount,umount", "-entrypoint", "/app", "-cmd", "serve"}); err != nil {
			t.Fatal(err)
		}
		unpacked := filepath.Join(dir, "index")
		os.MkdirAll(unpacked, 0o755)
		if b, err := exec.Command("tar", "-xf", out, "-C", unpacked).CombinedOutput(); err != nil {
			t.Fatalf("tar: %v %s", err, b)
		}
		top, err := layout.ImageIndexFromPath(unpacked)
		if err != nil {
			t.Fatal(err)
		}
		m, err := top.IndexManifest()
		if err != nil || len(m.Manifests) != 1 || !m.Manifests[0].MediaType.IsIndex() {
			t.Fatalf("layout index: %v %+v", err, m)
		}
		if got := m.Manifests[0].Annotations["org.opencontainers.image.ref.name"]; got != "docker.io/csi-memfs/csi-memfs:1.2.3" {
			t.Errorf("org.opencontainers.image.ref.name = %q", got)
		}
		idx, err := top.ImageIndex(m.Manifests[0].Digest)
		if err != nil {
			t.Fatal(err)
		}
		im, err := idx.IndexManifest()
		if err != nil || len(im.Manifests) != 2 {
			t.Fatalf("image index: %v %+v", err, im)
		}
		for i, arch := range []string{"amd64", "arm64"} {
			d := im.Manifests[i]
			if d.Platform == nil || d.Platform.OS != "linux" || d.Platform.Architecture != arch {
				t.Errorf("manifest %d: platform %+v, want linux/%s", i, d.Platform, arch)
			}
			img, err := idx.Image(d.Digest)
			if err != nil {
				t.Fatal(err)
			}
			check(t, img)
			if cf, _ := img.ConfigFile(); cf.Architecture != arch {
				t.Errorf("manifest %d: config architecture %q, want %s", i, cf.Architecture, arch)
			}
		}
	})
	t.Run("bad arguments", func(t *testing.T) {
		for _, bad := range [][]string{
			{"-o", filepath.Join(dir, "x.tar")},
			{"-o", filepath.Join(dir, "x.tar"), "-tag", "x:y", "-file", "relative", "-entrypoint", "/x"},
			{"-o", filepath.Join(dir, "x.tar"), "-tag", "x:y", "-file", bin + ":/x", "-entrypoint", "/x", "-format", "zip"},
			{"-o", filepath.Join(dir, "x.tar"), "-tag", "x:y", "-file", bin + ":/x", "-entrypoint", "/x", "-platform", "arm64"},
			{"-o", filepath.Join(dir, "x.tar"), "-tag", "x:y", "-file", bin + ":/x", "-entrypoint", "/x", "-platform", "linux/amd64,linux/arm64", "-format", "docker"},
		} {
			if err := run(bad); err == nil {
				t.Errorf("run(%q) succeeded", bad)
			}
		}
	})
}
