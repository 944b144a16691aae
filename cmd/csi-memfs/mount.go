package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"strings"
	"syscall"
	"unicode"

	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/csi-memfs/csi-memfs/driver"
	"github.com/csi-memfs/csi-memfs/volume"
)

type mountFlags struct {
	size          resource.Quantity
	inodes        uint64
	stateDir      string
	lower         string
	image         string
	imagePath     string
	pullPolicy    driver.PullPolicy
	imageCacheDir string
	insecure      []string
	allowed       []string
	caFile        string
	nodeConfigs   []string
	mirrors       map[string][]string
	pullSecret    string
	localImages   string
	noPassthrough bool
	kernelCache   bool
	transport     string
	debug         bool
	mountpoint    string
	// fsName, subtype and readOnly come from -o.
	fsName   string
	subtype  string
	readOnly bool
}

// mountOptionsHelp lists what -o accepts.
const mountOptionsHelp = "fsname=NAME, subtype=TYPE, ro, rw, and allow_other, default_permissions, nosuid, nodev (always in effect)"

// parseMountOption applies one comma-separated list of -o options to m.
func (m *mountFlags) parseMountOption(list string) error {
	for _, o := range strings.Split(list, ",") {
		key, value, hasValue := strings.Cut(o, "=")
		switch {
		case key == "fsname" && hasValue:
			if value == "" || strings.ContainsFunc(value, unicode.IsSpace) {
				return fmt.Errorf("fsname=%q: want a non-empty name without spaces or commas", value)
			}
			m.fsName = value
		case key == "subtype" && hasValue:
			if !validSubtype(value) {
				return fmt.Errorf("subtype=%q: want letters, digits, '_', '-' or '.'", value)
			}
			m.subtype = value
		case hasValue:
			return fmt.Errorf("%q: unknown option; accepted: %s", o, mountOptionsHelp)
		case key == "ro":
			m.readOnly = true
		case key == "rw":
			m.readOnly = false
		case key == "allow_other", key == "default_permissions", key == "nosuid", key == "nodev":
		default:
			return fmt.Errorf("%q: unknown option; accepted: %s", o, mountOptionsHelp)
		}
	}
	return nil
}

// validSubtype says whether s may follow "fuse." in a mount's type.
func validSubtype(s string) bool {
	if s == "" {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-' || r == '.') {
			return false
		}
	}
	return true
}

// parseMountFlags parses the mount command's arguments. Errors are one line,
// fit to print after "csi-memfs mount: ".
func parseMountFlags(args []string, out io.Writer) (*mountFlags, error) {
	m := &mountFlags{size: resource.MustParse("64Mi")}
	fs := flag.NewFlagSet("csi-memfs mount", flag.ContinueOnError)
	// Parse errors come back as one line; only --help prints the usage.
	fs.SetOutput(io.Discard)
	fs.Func("size", "memory limit of the volume, a Kubernetes quantity such as 64Mi or 1Gi (default 64Mi)", func(s string) error {
		q, err := resource.ParseQuantity(s)
		if err != nil || q.Sign() <= 0 {
			return fmt.Errorf("want a positive quantity such as 64Mi or 1Gi")
		}
		m.size = q
		return nil
	})
	fs.Uint64Var(&m.inodes, "inodes", 0, "inode limit of the volume (default: one per 4 KiB of size, at least 1024)")
	fs.StringVar(&m.lower, "lower", "", "a directory to serve read-only beneath the memory layer: the volume starts with its contents, and changes stay in memory")
	fs.StringVar(&m.image, "image", "", "an OCI image (registry reference, or "+driver.LocalImagePrefix+"NAME under --local-images) to serve read-only beneath the memory layer, like --lower")
	fs.StringVar(&m.imagePath, "image-path", "/", "directory of the image used as the volume root")
	pullPolicy := fs.String("image-pull-policy", "IfNotPresent", "Always, IfNotPresent or Never")
	fs.StringVar(&m.imageCacheDir, "image-cache-dir", defaultImageCacheDir(), "directory of the image cache; one process at a time uses it, so give each concurrent mount its own (or use the plugin's only when it is stopped)")
	registryFlags(fs, &m.insecure, &m.allowed, &m.caFile)
	registryAccessFlags(fs, &m.nodeConfigs, &m.mirrors)
	fs.StringVar(&m.pullSecret, "pull-secret", "", "a Docker config.json (or a .dockerconfigjson pull secret's content) with registry credentials; default: anonymous")
	fs.StringVar(&m.localImages, "local-images", "", "directory of local images an --image "+driver.LocalImagePrefix+"NAME[:TAG] names (OCI image layouts or image tarballs)")
	fs.StringVar(&m.stateDir, "state-dir", os.TempDir(), "directory under which the volume's private tmpfs instance is mounted")
	fs.BoolVar(&m.noPassthrough, "no-passthrough", false, "serve every read and write through the daemon instead of FUSE passthrough")
	fs.BoolVar(&m.kernelCache, "kernel-cache", false, "with -o ro: the kernel opens files without asking the daemon and keeps what it read cached across opens (a file read again costs no FUSE request; its pages are cached twice)")
	transportFlag(fs, &m.transport, "auto serves over io_uring where the kernel allows it (this command never hands its mount over), else /dev/fuse")
	fs.BoolVar(&m.debug, "debug", false, "log every FUSE request")
	fs.Func("o", "mount options, comma-separated (repeatable): "+mountOptionsHelp+"; fsname is the source df and /proc/mounts show, subtype makes the type fuse.TYPE", m.parseMountOption)
	usage := func() {
		fs.SetOutput(out)
		fmt.Fprintf(out, `Usage: csi-memfs mount [flags] MOUNTPOINT

Mounts a fresh memory volume on MOUNTPOINT (an empty directory) and serves it
until interrupted (Ctrl-C or SIGTERM), then unmounts it and exits 0. The
volume's bytes live in a private kernel tmpfs instance limited to --size;
everything in it is gone after the unmount. With --lower DIR the volume is
an overlay: it shows DIR's tree, DIR itself is never written, and what
changes is copied up into memory, only the pages written. With --image REF
the lower tree is the image's, pulled (or found) in the image cache as the
CSI plugin does: e.g.

  csi-memfs mount --image registry.example/team/app:1.2 --size 256Mi /mnt/app

Flags:
`)
		fs.PrintDefaults()
	}
	fs.Usage = func() {} // the flag package calls it on every error
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			usage()
		}
		return nil, err
	}
	if fs.NArg() != 1 {
		return nil, errors.New("want exactly one MOUNTPOINT (see --help)")
	}
	m.mountpoint = fs.Arg(0)
	if m.lower != "" && m.image != "" {
		return nil, errors.New("--lower and --image are exclusive")
	}
	if m.kernelCache && !m.readOnly {
		return nil, errors.New("--kernel-cache needs a read-only mount (-o ro): the kernel would not see changes to what it cached")
	}
	if m.image == "" {
		var set []string
		fs.Visit(func(f *flag.Flag) {
			switch f.Name {
			case "image-path", "image-pull-policy", "image-cache-dir", "insecure-registry", "allow-registry", "registry-ca-file", "pull-secret", "local-images":
				set = append(set, "--"+f.Name)
			}
		})
		if len(set) > 0 {
			return nil, fmt.Errorf("%s need --image", strings.Join(set, ", "))
		}
	}
	if m.image != "" {
		var ok bool
		if m.pullPolicy, ok = driver.ParsePullPolicy(*pullPolicy); !ok {
			return nil, fmt.Errorf("--image-pull-policy %q: want Always, IfNotPresent or Never", *pullPolicy)
		}
	}
	if m.lower != "" {
		if fi, err := os.Stat(m.lower); err != nil {
			return nil, fmt.Errorf("--lower %s: %v", m.lower, errors.Unwrap(err))
		} else if !fi.IsDir() {
			return nil, fmt.Errorf("--lower %s is not a directory", m.lower)
		}
	}
	entries, err := os.ReadDir(m.mountpoint)
	switch {
	case err != nil:
		return nil, fmt.Errorf("mountpoint %s: %v", m.mountpoint, errors.Unwrap(err))
	case len(entries) > 0:
		return nil, fmt.Errorf("mountpoint %s is not empty", m.mountpoint)
	}
	return m, nil
}

func runMount(args []string) int {
	m, err := parseMountFlags(args, os.Stdout)
	if code, done := flagsDone("mount", err); done {
		return code
	}
	if err := serveMount(m); err != nil {
		fmt.Fprintf(os.Stderr, "csi-memfs mount: %v\n", err)
		return 1
	}
	return 0
}

// serveMount mounts the volume, serves it until a signal or an external
// unmount, and cleans up.
func serveMount(m *mountFlags) error {
	// Take the signals before mounting: one that arrives while the mount
	// is being set up must unmount it, not kill the process and leave a
	// dead mount behind.
	sigs := make(chan os.Signal, 1)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM)
	defer signal.Stop(sigs)

	private, err := os.MkdirTemp(m.stateDir, "csi-memfs-")
	if err != nil {
		return err
	}
	defer os.RemoveAll(private)

	lowerDir := m.lower
	if m.image != "" {
		img, err := pullImage(m)
		if err != nil {
			return err
		}
		// Released after the volume is closed (deferred calls run last
		// first).
		defer img.Close()
		lowerDir = img.Dir
	}
	vol, err := volume.Build(volume.Config{
		Upper:              filepath.Join(private, "upper"),
		Size:               m.size.Value(),
		Inodes:             m.inodes,
		Fds:                volume.ProcessFdBudget(),
		Lower:              lowerDir,
		Target:             m.mountpoint,
		FsName:             m.fsName,
		Subtype:            m.subtype,
		ReadOnly:           m.readOnly,
		KernelCache:        m.kernelCache,
		DisablePassthrough: m.noPassthrough,
		Transport:          m.transport,
		NoHandover:         true,
		Debug:              m.debug,
	})
	if err != nil {
		return err
	}
	defer vol.Close()
	if err := vol.Mount(); err != nil {
		return err
	}
	done := make(chan struct{})
	go func() { vol.Wait(); close(done) }()

	u, _ := vol.Usage()
	over := ""
	if m.lower != "" {
		over = " over " + m.lower
	}
	if m.image != "" {
		over = " over image " + m.image
	}
	fmt.Fprintf(os.Stderr, "csi-memfs: serving %s%s (size %s, %d inodes, passthrough %s, over %s); Ctrl-C unmounts\n",
		m.mountpoint, over, &m.size, u.InodesLimit, onOff(vol.Passthrough()), vol.Transport())
	select {
	case s := <-sigs:
		fmt.Fprintf(os.Stderr, "csi-memfs: %v: unmounting %s\n", s, m.mountpoint)
		if err := vol.Unmount(); err != nil {
			return err
		}
	case <-done:
		fmt.Fprintf(os.Stderr, "csi-memfs: %s was unmounted\n", m.mountpoint)
	}
	return nil
}

// pullImage gets --image from the image cache, pinned, pulling it if
// needed; a SIGINT or SIGTERM abandons the pull. The caller closes the
// result once the volume is closed.
func pullImage(m *mountFlags) (*driver.PulledImage, error) {
	var secret []byte
	if m.pullSecret != "" {
		b, err := os.ReadFile(m.pullSecret)
		if err != nil {
			return nil, fmt.Errorf("--pull-secret: %w", err)
		}
		secret = b
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	img, err := driver.PullImage(ctx, driver.ImagePull{
		Image:              m.image,
		ImagePath:          m.imagePath,
		PullPolicy:         m.pullPolicy,
		PullSecret:         secret,
		CacheDir:           m.imageCacheDir,
		InsecureRegistries: m.insecure,
		AllowedRegistries:  m.allowed,
		RegistryCAFile:     m.caFile,
		NodeDockerConfigs:  m.nodeConfigs,
		RegistryMirrors:    m.mirrors,
		LocalImagesDir:     m.localImages,
		Progress: func(ref string, layer, layers int, bytes, totalBytes int64) {
			fmt.Fprintf(os.Stderr, "csi-memfs: pulling %s: layer %d of %d, %d of %d bytes\n", ref, layer+1, layers, bytes, totalBytes)
		},
	})
	var pe *driver.PullError
	if !errors.As(err, &pe) {
		return img, err
	}
	switch pe.Field {
	case "PullSecret":
		return nil, fmt.Errorf("--pull-secret %s: %w", m.pullSecret, pe.Err)
	case "CacheDir":
		return nil, fmt.Errorf("--image-cache-dir: %w", pe.Err)
	case "ImagePath":
		return nil, fmt.Errorf("--image-path: %w", pe.Err)
	}
	return nil, fmt.Errorf("--image %s: %w", m.image, pe.Err)
}

// defaultImageCacheDir is the user's cache directory's csi-memfs/images.
func defaultImageCacheDir() string {
	d, err := os.UserCacheDir()
	if err != nil {
		d = os.TempDir()
	}
	return filepath.Join(d, "csi-memfs", "images")
}

func onOff(b bool) string {
	if b {
		return "on"
	}
	return "off"
}
