// Command ociimage builds a container image from local files, without a
// container engine, and writes it as a tarball that `ctr images import`,
// `docker load` and `podman load` accept.
//
// The csi-memfs plugin image is a static csi-memfs binary plus a static
// busybox for the tools mount-utils runs (mount, umount):
//
//	go run ./hack/ociimage -o bin/csi-memfs-image.tar -tag docker.io/csi-memfs/csi-memfs:dev \
//	    -file bin/csi-memfs:/csi-memfs -busybox /bin/busybox -entrypoint /csi-memfs
//
// The e2e pause image (containerd's sandbox_image) is one static program:
//
//	go run ./hack/ociimage -o pause.tar -tag registry.k8s.io/pause:3.10 \
//	    -file bin/pause:/pause -entrypoint /pause
//
// With -platform naming more than one platform, the tarball holds an image
// index (a multi-platform image) with one image per platform; "{arch}" in a
// -file source or in -busybox stands for the platform's architecture
// (amd64, arm64), so each image gets its own binaries:
//
//	go run ./hack/ociimage -o bin/release/csi-memfs-image.tar -tag docker.io/csi-memfs/csi-memfs:0.2.0 \
//	    -platform linux/amd64,linux/arm64 -file bin/release/linux-{arch}/csi-memfs:/csi-memfs \
//	    -busybox bin/release/linux-{arch}/busybox -entrypoint /csi-memfs -cmd serve
//
// Each image has one layer; every file in it has mtime 0 and root ownership,
// so the same inputs give the same image digest.
package main

import (
	"archive/tar"
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"os"
	"os/exec"
	"path"
	"path/filepath"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// busyboxApplets are the busybox commands linked into /bin: what
// mount-utils runs, plus a shell and the basics for debugging in the pod.
var busyboxApplets = []string{
	"sh", "mount", "umount", "ls", "cat", "df", "mkdir", "rm", "mv", "cp", "ln",
	"ps", "sleep", "grep", "find", "stat", "test", "echo", "du", "wget",
}

// fileSpec is one -file argument: a local file copied to a path in the image.
type fileSpec struct {
	src, dst string
	mode     int64
}

type fileList []fileSpec

func (l *fileList) String() string { return fmt.Sprint(*l) }

// Set parses SRC:DST[:MODE] (octal MODE, default the source's permissions).
func (l *fileList) Set(s string) error {
	parts := strings.Split(s, ":")
	if len(parts) < 2 || len(parts) > 3 || parts[0] == "" || !path.IsAbs(parts[1]) {
		return fmt.Errorf("want SRC:/DST[:MODE], got %q", s)
	}
	f := fileSpec{src: parts[0], dst: path.Clean(parts[1])}
	if len(parts) == 3 {
		m, err := strconv.ParseInt(parts[2], 8, 32)
		if err != nil {
			return fmt.Errorf("mode %q: want octal such as 0755", parts[2])
		}
		f.mode = m
	}
	*l = append(*l, f)
	return nil
}

type options struct {
	out, tag, format, busybox, entrypoint string
	platforms                             []v1.Platform
	applets                               []string
	cmd, env                              []string
	files                                 fileList
	labels                                map[string]string
}

func main() {
	if err := run(os.Args[1:]); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			os.Exit(0)
		}
		fmt.Fprintf(os.Stderr, "ociimage: %v\n", err)
		os.Exit(2)
	}
}

func run(args []string) error {
	var o options
	var cmd, env, labels, applets string
	fs := flag.NewFlagSet("ociimage", flag.ContinueOnError)
	fs.StringVar(&o.out, "o", "", "output tarball (required)")
	fs.StringVar(&o.tag, "tag", "", "image reference recorded in the tarball, e.g. docker.io/csi-memfs/csi-memfs:dev (required)")
	fs.StringVar(&o.format, "format", "oci", "tarball format: oci (OCI image layout) or docker (docker save)")
	fs.Var(&o.files, "file", "SRC:/DST[:MODE] copies a local file into the image (repeatable)")
	fs.StringVar(&o.busybox, "busybox", "", "static busybox binary to install as /bin/busybox with applet links (mount, umount, sh, ...)")
	fs.StringVar(&applets, "applets", "", "comma-separated busybox applets to link into /bin, or \"all\" for every applet (default: sh, mount, umount and a few basics)")
	fs.StringVar(&o.entrypoint, "entrypoint", "", "the image's entrypoint (required)")
	fs.StringVar(&cmd, "cmd", "", "space-separated default arguments")
	fs.StringVar(&env, "env", "PATH=/bin", "comma-separated KEY=VALUE environment")
	fs.StringVar(&labels, "labels", "", "comma-separated KEY=VALUE image labels")
	platforms := fs.String("platform", "linux/"+runtime.GOARCH, "comma-separated OS/ARCH platforms; more than one writes an image index, and {arch} in -file and -busybox sources names each one's architecture")
	if err := fs.Parse(args); err != nil {
		return err
	}
	for _, p := range strings.Split(*platforms, ",") {
		goos, arch, ok := strings.Cut(p, "/")
		if !ok || goos != "linux" || arch == "" || strings.Contains(arch, "/") {
			return fmt.Errorf("-platform %q: want linux/ARCH such as linux/amd64", p)
		}
		o.platforms = append(o.platforms, v1.Platform{OS: goos, Architecture: arch})
	}
	if o.out == "" || o.tag == "" || o.entrypoint == "" || len(o.files) == 0 {
		fs.Usage()
		return errors.New("-o, -tag, -entrypoint and at least one -file are required")
	}
	o.cmd = strings.Fields(cmd)
	switch applets {
	case "":
		o.applets = busyboxApplets
	case "all":
		if o.busybox == "" || len(o.platforms) != 1 {
			return errors.New("-applets all needs -busybox and one -platform")
		}
		out, err := exec.Command(archPath(o.busybox, o.platforms[0].Architecture), "--list").Output()
		if err != nil {
			return fmt.Errorf("%s --list: %w", o.busybox, err)
		}
		for _, a := range strings.Fields(string(out)) {
			if a != "busybox" && !strings.ContainsAny(a, "/[") {
				o.applets = append(o.applets, a)
			}
		}
	default:
		o.applets = strings.Split(applets, ",")
	}
	if env != "" {
		o.env = strings.Split(env, ",")
	}
	o.labels = map[string]string{}
	if labels != "" {
		for _, kv := range strings.Split(labels, ",") {
			k, v, ok := strings.Cut(kv, "=")
			if !ok {
				return fmt.Errorf("label %q: want KEY=VALUE", kv)
			}
			o.labels[k] = v
		}
	}
	return build(o)
}

// build writes the image o describes to o.out: one image, or with several
// platforms an index of one image per platform.
func build(o options) error {
	ref, err := name.ParseReference(o.tag)
	if err != nil {
		return fmt.Errorf("tag: %w", err)
	}
	imageName := fullName(o.tag)
	var adds []mutate.IndexAddendum
	for _, p := range o.platforms {
		img, err := platformImage(o, p)
		if err != nil {
			return fmt.Errorf("%s/%s: %w", p.OS, p.Architecture, err)
		}
		p := p
		adds = append(adds, mutate.IndexAddendum{Add: img, Descriptor: v1.Descriptor{Platform: &p}})
	}

	tmp := o.out + ".tmp"
	defer os.RemoveAll(tmp)
	var digest v1.Hash
	switch {
	case o.format == "docker" && len(adds) == 1:
		img := adds[0].Add.(v1.Image)
		digest, _ = img.Digest()
		if err := tarball.WriteToFile(tmp, ref, img); err != nil {
			return err
		}
	case o.format == "docker":
		return errors.New("-format docker holds one platform; use -format oci for an index")
	case o.format == "oci":
		var item mutate.Appendable
		if len(adds) == 1 {
			item = adds[0].Add
		} else {
			item = mutate.AppendManifests(mutate.IndexMediaType(empty.Index, types.OCIImageIndex), adds...)
		}
		digest, _ = item.Digest()
		if err := writeOCIArchive(tmp, imageName, item); err != nil {
			return err
		}
	default:
		return fmt.Errorf("-format %q: want oci or docker", o.format)
	}
	if err := os.Rename(tmp, o.out); err != nil {
		return err
	}
	fmt.Printf("%s %s %s\n", o.out, imageName, digest)
	return nil
}

// archPath replaces {arch} in a source path with arch.
func archPath(src, arch string) string { return strings.ReplaceAll(src, "{arch}", arch) }

// platformImage is the image of one platform.
func platformImage(o options, p v1.Platform) (v1.Image, error) {
	layerTar, err := rootfs(o, p.Architecture)
	if err != nil {
		return nil, err
	}
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(layerTar)), nil
	}, tarball.WithMediaType(types.OCILayer))
	if err != nil {
		return nil, err
	}
	img, err := mutate.AppendLayers(mutate.MediaType(empty.Image, types.OCIManifestSchema1), layer)
	if err != nil {
		return nil, err
	}
	img = mutate.ConfigMediaType(img, types.OCIConfigJSON)
	cf, err := img.ConfigFile()
	if err != nil {
		return nil, err
	}
	cf = cf.DeepCopy()
	cf.Architecture, cf.OS = p.Architecture, p.OS
	cf.Created = v1.Time{Time: time.Unix(0, 0).UTC()}
	cf.Config.Entrypoint = []string{o.entrypoint}
	cf.Config.Cmd = o.cmd
	cf.Config.Env = o.env
	cf.Config.Labels = o.labels
	return mutate.ConfigFile(img, cf)
}

// fullName is ref as containerd and kubelet name it: docker.io/library/x:tag
// for x:tag, docker.io/org/x:tag for org/x:tag, unchanged with a registry
// host ("host.domain/x", "host:port/x", "localhost/x").
func fullName(ref string) string {
	first, _, hasSlash := strings.Cut(ref, "/")
	if hasSlash && (strings.ContainsAny(first, ".:") || first == "localhost") {
		return ref
	}
	if !hasSlash {
		ref = "library/" + ref
	}
	return "docker.io/" + ref
}

// writeOCIArchive writes item (an image or an image index) as a tar of an
// OCI image layout. The layout's index names it twice:
// io.containerd.image.name (the full reference, which `ctr images import`
// uses) and org.opencontainers.image.ref.name.
func writeOCIArchive(out, imageName string, item mutate.Appendable) error {
	dir, err := os.MkdirTemp(filepath.Dir(out), ".oci-layout-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	p, err := layout.Write(dir, empty.Index)
	if err != nil {
		return err
	}
	annotations := layout.WithAnnotations(map[string]string{
		"io.containerd.image.name":          imageName,
		"org.opencontainers.image.ref.name": imageName,
	})
	switch item := item.(type) {
	case v1.Image:
		err = p.AppendImage(item, annotations)
	case v1.ImageIndex:
		err = p.AppendIndex(item, annotations)
	default:
		err = fmt.Errorf("cannot write %T", item)
	}
	if err != nil {
		return err
	}
	f, err := os.Create(out)
	if err != nil {
		return err
	}
	tw := tar.NewWriter(f)
	err = filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || p == dir {
			return err
		}
		rel, _ := filepath.Rel(dir, p)
		if d.IsDir() {
			return tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: rel + "/", Mode: 0o755, ModTime: time.Unix(0, 0)})
		}
		b, err := os.ReadFile(p)
		if err != nil {
			return err
		}
		if err := tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: rel, Mode: 0o644, Size: int64(len(b)), ModTime: time.Unix(0, 0)}); err != nil {
			return err
		}
		_, err = tw.Write(b)
		return err
	})
	if err == nil {
		err = tw.Close()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	return err
}

// entry is one file, directory or symlink of the root filesystem.
type entry struct {
	hdr  tar.Header
	data []byte
}

// rootfs returns the single layer of arch's image as an uncompressed tar.
func rootfs(o options, arch string) ([]byte, error) {
	entries := map[string]*entry{}
	addDirs := func(p string) {
		for d := path.Dir(p); d != "/"; d = path.Dir(d) {
			name := strings.TrimPrefix(d, "/") + "/"
			if _, ok := entries[name]; !ok {
				entries[name] = &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: name, Mode: 0o755}}
			}
		}
	}
	addFile := func(src, dst string, mode int64) error {
		b, err := os.ReadFile(src)
		if err != nil {
			return err
		}
		if mode == 0 {
			fi, err := os.Stat(src)
			if err != nil {
				return err
			}
			mode = int64(fi.Mode().Perm())
		}
		addDirs(dst)
		entries[strings.TrimPrefix(dst, "/")] = &entry{
			hdr:  tar.Header{Typeflag: tar.TypeReg, Name: strings.TrimPrefix(dst, "/"), Mode: mode, Size: int64(len(b))},
			data: b,
		}
		return nil
	}
	for _, f := range o.files {
		if err := addFile(archPath(f.src, arch), f.dst, f.mode); err != nil {
			return nil, err
		}
	}
	if o.busybox != "" {
		if err := addFile(archPath(o.busybox, arch), "/bin/busybox", 0o755); err != nil {
			return nil, err
		}
		for _, a := range o.applets {
			n := "bin/" + a
			if _, ok := entries[n]; ok {
				continue // a -file wins over an applet link
			}
			entries[n] = &entry{hdr: tar.Header{Typeflag: tar.TypeSymlink, Name: n, Linkname: "busybox", Mode: 0o777}}
		}
	}
	// Directories a plugin container expects to exist.
	for _, d := range []string{"tmp/", "etc/", "proc/", "sys/", "dev/"} {
		mode := int64(0o755)
		if d == "tmp/" {
			mode = 0o1777
		}
		entries[d] = &entry{hdr: tar.Header{Typeflag: tar.TypeDir, Name: d, Mode: mode}}
	}

	names := make([]string, 0, len(entries))
	for n := range entries {
		names = append(names, n)
	}
	sort.Strings(names)
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	for _, n := range names {
		e := entries[n]
		e.hdr.ModTime = time.Unix(0, 0)
		e.hdr.Format = tar.FormatPAX
		if err := tw.WriteHeader(&e.hdr); err != nil {
			return nil, err
		}
		if _, err := tw.Write(e.data); err != nil {
			return nil, err
		}
	}
	if err := tw.Close(); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}
