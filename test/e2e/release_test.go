package e2e

import (
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"testing"

	"github.com/google/go-containerregistry/pkg/v1/layout"
)

// chartField returns a top-level field of Chart.yaml, unquoted.
func chartField(t *testing.T, key string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, chartDir, "Chart.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^` + key + `: *"?([^"\n]*)"?\s*$`).FindSubmatch(b)
	if m == nil {
		t.Fatalf("Chart.yaml has no %s", key)
	}
	return string(m[1])
}

// TestChartVersion: the chart's version is its appVersion (one version for
// chart, image and binary), and it names the Kubernetes versions it needs.
func TestChartVersion(t *testing.T) {
	if v, app := chartField(t, "version"), chartField(t, "appVersion"); v != app {
		t.Errorf("Chart.yaml: version %q, appVersion %q: a release has one version", v, app)
	}
	if kv := chartField(t, "kubeVersion"); kv == "" {
		t.Errorf("Chart.yaml: no kubeVersion")
	}
	out, err := exec.Command("make", "-s", "-C", repoRoot, "version").CombinedOutput()
	if err != nil || string(out) != chartField(t, "appVersion")+"\n" {
		t.Errorf("make version: %q, %v; want the chart's appVersion", out, err)
	}
}

// TestReleaseImageIndex: `make image-index`, the step of `make image` and
// `make release-dry-run` that writes the image, makes an OCI image index
// with a linux/amd64 and a linux/arm64 image, named with the chart's
// image.repository and appVersion: the image the chart installs by default.
// Stand-in files replace the cross-compiled binaries.
func TestReleaseImageIndex(t *testing.T) {
	if testing.Short() {
		t.Skip("builds hack/ociimage; skipped with -short")
	}
	dir := t.TempDir()
	for _, arch := range []string{"amd64", "arm64"} {
		os.MkdirAll(filepath.Join(dir, "linux-"+arch), 0o755)
		for _, f := range []string{"csi-memfs", "busybox"} {
			if err := os.WriteFile(filepath.Join(dir, "linux-"+arch, f), []byte("#!/bin/sh\n# "+arch+"\n"), 0o755); err != nil {
				t.Fatal(err)
			}
		}
	}
	cmd := exec.Command("make", "-s", "image-index", "RELEASE="+dir)
	cmd.Dir = repoRoot
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("make image-index: %v\n%s", err, out)
	}
	version := chartField(t, "appVersion")
	values, err := os.ReadFile(filepath.Join(repoRoot, chartDir, "values.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile(`(?m)^image:\n  repository: (\S+)$`).FindSubmatch(values)
	if m == nil {
		t.Fatal("values.yaml: no image.repository")
	}
	wantName := string(m[1]) + ":" + version

	tarball := filepath.Join(dir, "csi-memfs-image-"+version+".oci.tar")
	unpacked := filepath.Join(dir, "layout")
	os.MkdirAll(unpacked, 0o755)
	if out, err := exec.Command("tar", "-xf", tarball, "-C", unpacked).CombinedOutput(); err != nil {
		t.Fatalf("tar: %v\n%s", err, out)
	}
	top, err := layout.ImageIndexFromPath(unpacked)
	if err != nil {
		t.Fatal(err)
	}
	tm, err := top.IndexManifest()
	if err != nil || len(tm.Manifests) != 1 || !tm.Manifests[0].MediaType.IsIndex() {
		t.Fatalf("the layout holds %+v (%v); want one image index", tm, err)
	}
	for _, a := range []string{"org.opencontainers.image.ref.name", "io.containerd.image.name"} {
		if got := tm.Manifests[0].Annotations[a]; got != wantName {
			t.Errorf("%s = %q, want %q (values.yaml image.repository, Chart.yaml appVersion)", a, got, wantName)
		}
	}
	idx, err := top.ImageIndex(tm.Manifests[0].Digest)
	if err != nil {
		t.Fatal(err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		t.Fatal(err)
	}
	var platforms []string
	for _, d := range im.Manifests {
		if d.Platform == nil {
			t.Fatalf("manifest %s has no platform", d.Digest)
		}
		platforms = append(platforms, d.Platform.OS+"/"+d.Platform.Architecture)
	}
	slices.Sort(platforms)
	if !slices.Equal(platforms, []string{"linux/amd64", "linux/arm64"}) {
		t.Errorf("the index's platforms are %v, want linux/amd64 and linux/arm64", platforms)
	}
}

// TestAlertRules: the chart's alerting rules pass promtool's check and the
// unit tests of test/prometheus/alerts_test.yaml (promtool from Debian's
// prometheus package, hack/promtool.sh).
func TestAlertRules(t *testing.T) {
	if testing.Short() {
		t.Skip("needs promtool (fetched once with apt-get download); skipped with -short")
	}
	for _, args := range [][]string{
		{"check", "rules", filepath.Join(chartDir, "rules", "alerts.yaml")},
		{"test", "rules", "test/prometheus/alerts_test.yaml"},
	} {
		cmd := exec.Command("bash", append([]string{"hack/promtool.sh"}, args...)...)
		cmd.Dir = repoRoot
		if out, err := cmd.CombinedOutput(); err != nil {
			t.Errorf("promtool %v: %v\n%s", args, err, out)
		}
	}
}

// TestDocsDiagrams: every docs/*.svg is what Graphviz makes of the .dot
// source beside it (make docs-diagrams). Skipped without dot, or with a
// Graphviz other than the one that drew the committed files (layouts
// differ between versions).
func TestDocsDiagrams(t *testing.T) {
	dot, err := exec.LookPath("dot")
	if err != nil {
		t.Skip("no dot (apt-get install graphviz)")
	}
	sources, _ := filepath.Glob(filepath.Join(repoRoot, "docs", "*.dot"))
	if len(sources) < 2 {
		t.Fatalf("found %d docs/*.dot, want the data path and the handover", len(sources))
	}
	generator := regexp.MustCompile(`<!-- Generated by graphviz version ([^\n]*)`)
	for _, src := range sources {
		svg := src[:len(src)-len(".dot")] + ".svg"
		have, err := os.ReadFile(svg)
		if err != nil {
			t.Errorf("%v (make docs-diagrams)", err)
			continue
		}
		fresh, err := exec.Command(dot, "-Tsvg", src).Output()
		if err != nil {
			t.Fatalf("dot -Tsvg %s: %v", src, err)
		}
		h, f := generator.FindSubmatch(have), generator.FindSubmatch(fresh)
		if h == nil || f == nil {
			t.Errorf("%s: no Graphviz version comment", svg)
			continue
		}
		if string(h[1]) != string(f[1]) {
			t.Skipf("%s was drawn by Graphviz %s, this machine has %s", filepath.Base(svg), h[1], f[1])
		}
		if string(have) != string(fresh) {
			t.Errorf("%s is stale: run make docs-diagrams", filepath.Base(svg))
		}
	}
}
