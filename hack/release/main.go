// Command release checks a release's image and chart and runs their pushes
// against a throwaway registry, so that `make release-dry-run` exercises
// every step of a release without reaching a real registry.
//
// It checks that the image tarball (hack/ociimage, an OCI layout) holds one
// image index named REPO:VERSION with an image for every -platform, and
// that the chart package is csi-memfs-VERSION.tgz. Then an in-memory OCI
// registry on 127.0.0.1 receives the image index (as the release
// workflow's crane push sends it) and the chart (`helm push --plain-http`,
// Helm's own code path). The chart artifact Helm pushed is read back, its
// media types and content checked, and written as an OCI layout tarball.
//
//	go run ./hack/release -version 0.2.0 -image-repo docker.io/csi-memfs/csi-memfs \
//	    -image bin/release/csi-memfs-image.oci.tar -chart bin/release/csi-memfs-0.2.0.tgz \
//	    -helm "bash test/e2e/helm.sh" -chart-artifact bin/release/csi-memfs-chart-0.2.0.oci.tar
package main

import (
	"archive/tar"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Helm's OCI media types (helm.sh/helm/v3/pkg/registry).
const (
	helmConfigMediaType = "application/vnd.cncf.helm.config.v1+json"
	helmChartMediaType  = "application/vnd.cncf.helm.chart.content.v1.tar+gzip"
)

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "release: %v\n", err)
		os.Exit(1)
	}
}

func run(args []string) error {
	fs := flag.NewFlagSet("release", flag.ContinueOnError)
	version := fs.String("version", "", "the release version (the chart's version and appVersion) (required)")
	imageRepo := fs.String("image-repo", "", "the image repository, e.g. docker.io/csi-memfs/csi-memfs (required)")
	image := fs.String("image", "", "the image tarball hack/ociimage wrote (required)")
	platforms := fs.String("platforms", "linux/amd64,linux/arm64", "platforms the image index must hold")
	chart := fs.String("chart", "", "the chart package helm package wrote (required)")
	chartArtifact := fs.String("chart-artifact", "", "where to write the chart's OCI artifact as an OCI layout tarball (required)")
	helm := fs.String("helm", "helm", "the helm command, split at spaces")
	if err := fs.Parse(args); err != nil {
		return err
	}
	if *version == "" || *imageRepo == "" || *image == "" || *chart == "" || *chartArtifact == "" {
		fs.Usage()
		return errors.New("-version, -image-repo, -image, -chart and -chart-artifact are required")
	}

	tmp, err := os.MkdirTemp("", "release-image-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(tmp)
	idx, err := checkImage(*image, tmp, *imageRepo+":"+*version, strings.Split(*platforms, ","))
	if err != nil {
		return fmt.Errorf("%s: %w", *image, err)
	}
	if got, want := filepath.Base(*chart), "csi-memfs-"+*version+".tgz"; got != want {
		return fmt.Errorf("chart package %s: want %s (helm package --version %s)", *chart, want, *version)
	}

	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	srv := &http.Server{Handler: registry.New(registry.Logger(log.New(io.Discard, "", 0)))}
	go srv.Serve(ln)
	defer srv.Close()
	host := ln.Addr().String()

	// The image, as the release workflow's crane push sends it.
	repo := *imageRepo
	if i := strings.Index(repo, "/"); i >= 0 {
		repo = repo[i+1:]
	}
	ref, err := name.ParseReference(host+"/"+repo+":"+*version, name.Insecure)
	if err != nil {
		return err
	}
	if err := remote.WriteIndex(ref, idx); err != nil {
		return fmt.Errorf("pushing the image index to the throwaway registry: %w", err)
	}
	if _, err := remote.Index(ref); err != nil {
		return fmt.Errorf("reading the image index back: %w", err)
	}
	fmt.Printf("release: image %s:%s pushed to a throwaway registry as %s\n", *imageRepo, *version, ref)

	// The chart, as the release workflow's helm push sends it.
	h := strings.Fields(*helm)
	cmd := exec.Command(h[0], append(h[1:], "push", *chart, "oci://"+host+"/charts", "--plain-http")...)
	cmd.Stdout, cmd.Stderr = os.Stderr, os.Stderr
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("helm push: %w", err)
	}
	chartRef, err := name.ParseReference(host+"/charts/csi-memfs:"+*version, name.Insecure)
	if err != nil {
		return err
	}
	art, err := remote.Image(chartRef)
	if err != nil {
		return fmt.Errorf("reading the pushed chart back: %w", err)
	}
	if err := checkChartArtifact(art, *chart); err != nil {
		return fmt.Errorf("chart artifact: %w", err)
	}
	if err := writeLayoutTar(*chartArtifact, art, "csi-memfs:"+*version); err != nil {
		return err
	}
	fmt.Printf("release: chart csi-memfs %s pushed with helm push; its OCI artifact is %s\n", *version, *chartArtifact)
	return nil
}

// checkImage unpacks the image tarball into dir and checks that it holds
// one image index named ref with an image for each platform; it returns
// the index, which reads its blobs from dir.
func checkImage(tarPath, dir, ref string, platforms []string) (v1.ImageIndex, error) {
	if err := untar(tarPath, dir); err != nil {
		return nil, err
	}
	top, err := layout.ImageIndexFromPath(dir)
	if err != nil {
		return nil, err
	}
	m, err := top.IndexManifest()
	if err != nil {
		return nil, err
	}
	if len(m.Manifests) != 1 || !m.Manifests[0].MediaType.IsIndex() {
		return nil, fmt.Errorf("want one image index in the layout, found %d entries", len(m.Manifests))
	}
	if got := m.Manifests[0].Annotations["org.opencontainers.image.ref.name"]; got != ref {
		return nil, fmt.Errorf("the index is named %q, want %q (the chart's appVersion)", got, ref)
	}
	idx, err := top.ImageIndex(m.Manifests[0].Digest)
	if err != nil {
		return nil, err
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, err
	}
	var have []string
	for _, d := range im.Manifests {
		if d.Platform == nil {
			return nil, fmt.Errorf("manifest %s has no platform", d.Digest)
		}
		p := d.Platform.OS + "/" + d.Platform.Architecture
		img, err := idx.Image(d.Digest)
		if err != nil {
			return nil, err
		}
		cf, err := img.ConfigFile()
		if err != nil {
			return nil, err
		}
		if cf.OS+"/"+cf.Architecture != p {
			return nil, fmt.Errorf("the %s manifest's config says %s/%s", p, cf.OS, cf.Architecture)
		}
		have = append(have, p)
	}
	for _, p := range platforms {
		if !slices.Contains(have, p) {
			return nil, fmt.Errorf("the index has no %s image (it has %v)", p, have)
		}
	}
	fmt.Printf("release: %s is an image index named %s for %v\n", tarPath, ref, have)
	return idx, nil
}

// checkChartArtifact checks the media types Helm pushed and that the
// chart layer is the package.
func checkChartArtifact(art v1.Image, pkg string) error {
	mf, err := art.Manifest()
	if err != nil {
		return err
	}
	if mf.Config.MediaType != helmConfigMediaType {
		return fmt.Errorf("config media type %s, want %s", mf.Config.MediaType, helmConfigMediaType)
	}
	layers, err := art.Layers()
	if err != nil {
		return err
	}
	if len(layers) != 1 {
		return fmt.Errorf("%d layers, want the chart's one", len(layers))
	}
	mt, err := layers[0].MediaType()
	if err != nil {
		return err
	}
	if mt != helmChartMediaType {
		return fmt.Errorf("layer media type %s, want %s", mt, helmChartMediaType)
	}
	rc, err := layers[0].Compressed()
	if err != nil {
		return err
	}
	defer rc.Close()
	got, err := io.ReadAll(rc)
	if err != nil {
		return err
	}
	want, err := os.ReadFile(pkg)
	if err != nil {
		return err
	}
	if string(got) != string(want) {
		return fmt.Errorf("the chart layer differs from %s", pkg)
	}
	return nil
}

// writeLayoutTar writes img as a tarball of an OCI layout naming it ref.
func writeLayoutTar(out string, img v1.Image, ref string) error {
	dir, err := os.MkdirTemp(filepath.Dir(out), ".chart-layout-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{
		"org.opencontainers.image.ref.name": ref,
	})); err != nil {
		return err
	}
	cmd := exec.Command("tar", "--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner", "-cf", out, "-C", dir, ".")
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("tar: %v: %s", err, b)
	}
	return nil
}

// untar extracts the tarball at src into dir (regular files and
// directories only, no path out of dir).
func untar(src, dir string) error {
	f, err := os.Open(src)
	if err != nil {
		return err
	}
	defer f.Close()
	tr := tar.NewReader(f)
	for {
		h, err := tr.Next()
		if err == io.EOF {
			return nil
		}
		if err != nil {
			return err
		}
		p := filepath.Join(dir, filepath.Clean("/"+h.Name))
		switch h.Typeflag {
		case tar.TypeDir:
			if err := os.MkdirAll(p, 0o755); err != nil {
				return err
			}
		case tar.TypeReg:
			if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
				return err
			}
			w, err := os.Create(p)
			if err != nil {
				return err
			}
			_, err = io.Copy(w, tr)
			if cerr := w.Close(); err == nil {
				err = cerr
			}
			if err != nil {
				return err
			}
		default:
			return fmt.Errorf("%s: unexpected entry type %c", h.Name, h.Typeflag)
		}
	}
}
