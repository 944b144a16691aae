package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"runtime/debug"
	"strings"
	"syscall"

	"k8s.io/apimachinery/pkg/api/resource"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/driver"
	"github.com/csi-memfs/csi-memfs/volume"
)

// buildVersion is the version GetPluginInfo reports; release builds set it
// with -ldflags "-X main.buildVersion=v1.2.3". Empty: the module version
// from the build info.
var buildVersion string

// parseServeFlags parses the serve command's arguments into a driver
// configuration. klog's flags (-v, ...) are registered on the same set.
func parseServeFlags(args []string, out io.Writer) (driver.Config, error) {
	cfg, _, err := parseServeArgs(args, out)
	return cfg, err
}

// serveOptions are the serve command's options besides the driver's.
type serveOptions struct {
	// provisioner runs the node's provisioner (provision.go).
	provisioner bool
}

// parseServeArgs is parseServeFlags, with the options that are not the
// driver's.
func parseServeArgs(args []string, out io.Writer) (driver.Config, serveOptions, error) {
	cfg := driver.Config{Version: versionString()}
	var opts serveOptions
	fs := flag.NewFlagSet("csi-memfs serve", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&cfg.Endpoint, "endpoint", "unix:///csi/csi.sock", "CSI endpoint kubelet connects to")
	fs.StringVar(&cfg.NodeID, "node-id", os.Getenv("NODE_NAME"), "node id reported to kubelet, normally the node name (default $NODE_NAME)")
	fs.StringVar(&cfg.DriverName, "driver-name", driver.DefaultDriverName, "CSI driver name (the CSIDriver object's name)")
	fs.StringVar(&cfg.StateDir, "state-dir", defaultStateDir, "directory for the volume journal and the volumes' private tmpfs mounts")
	fs.StringVar(&cfg.MetricsAddress, "metrics-address", ":9809", "listen address of /metrics and /healthz; empty disables them")
	fs.StringVar(&cfg.KubeletRegistrationPath, "kubelet-registration-path", "",
		"the CSI socket's path as kubelet sees it on the host, e.g. /var/lib/kubelet/plugins/memfs.csi.dev/csi.sock; "+
			"when set, the plugin registers itself with kubelet (no node-driver-registrar sidecar)")
	fs.StringVar(&cfg.KubeletDir, "kubelet-dir", driver.DefaultKubeletDir,
		"kubelet's root directory as this process sees it: target paths must lie under its pods/ directory, with no symlink below it")
	fs.StringVar(&cfg.RegistrationDir, "registration-dir", "/registration",
		"kubelet's plugins_registry directory as this process sees it; the registration socket is <driver-name>-reg.sock in it")
	quantity(fs, &cfg.DefaultVolumeSize, "default-volume-size", "64Mi", "size of a volume without a size attribute")
	quantity(fs, &cfg.MaxVolumeSize, "max-volume-size", "", "largest size attribute accepted (default: the node budget, or 1Gi without one)")
	fs.Uint64Var(&cfg.DefaultVolumeInodes, "default-volume-inodes", 0,
		"inode limit of a volume without an inodes attribute (0: one per 4 KiB of size, at least 1024, at most --max-volume-inodes)")
	fs.Uint64Var(&cfg.MaxVolumeInodes, "max-volume-inodes", driver.DefaultMaxVolumeInodes,
		"largest inode limit of a volume (tmpfs charges inodes outside the size)")
	quantity(fs, &cfg.NodeBudget, "node-memory-budget", "", "memory all volumes on the node may reserve together, e.g. 8Gi (default: no budget)")
	fs.Int64Var(&cfg.MaxVolumes, "max-volumes", 0, "volumes the node serves at once, reported as max_volumes_per_node (0: no limit)")
	fs.StringVar(&cfg.ImageCacheDir, "image-cache-dir", "", "directory of the node's image cache (default <state-dir>/images)")
	quantity(fs, &cfg.ImageCacheBudget, "image-cache-budget", "", "disk the image cache keeps itself under by collecting unused images, e.g. 20Gi (default: no limit)")
	registryFlags(fs, &cfg.InsecureRegistries, &cfg.AllowedRegistries, &cfg.RegistryCAFile)
	registryAccessFlags(fs, &cfg.NodeDockerConfigs, &cfg.RegistryMirrors)
	fs.StringVar(&cfg.CredentialProviderConfig, "image-credential-provider-config", "",
		"kubelet CredentialProviderConfig file (YAML or JSON) of credential provider plugins asked for registry credentials after the pull secret and --node-docker-config (default: none)")
	fs.StringVar(&cfg.CredentialProviderBinDir, "image-credential-provider-bin-dir", "",
		"directory of the credential provider plugins --image-credential-provider-config names")
	fs.Int64Var(&cfg.ImageMaxFiles, "image-max-files", 0, "entries one image may hold, its layers together (0: 1048576; negative: no limit)")
	fs.IntVar(&cfg.ImageMaxPathLength, "image-max-path-length", 0, "longest path or link target in an image, in bytes (0: 4096)")
	quantity(fs, &cfg.ImageDiskReserve, "image-disk-reserve", "", "free disk flattening an image leaves on the cache's file system (default: the smaller of 1Gi and 5% of it)")
	fs.StringVar(&cfg.LocalImagesDir, "local-images", "", "directory of local images (OCI image layouts or image tarballs) a volume names as "+driver.LocalImagePrefix+"NAME[:TAG] (default: none)")
	fs.DurationVar(&cfg.HandoverWait, "handover-wait", 0, "on SIGTERM, how long to wait for a successor (a replacement plugin pod) to take the volumes over before stopping; the chart sets 20s")
	fs.BoolVar(&cfg.DisablePassthrough, "no-passthrough", false, "serve every read and write through the daemon instead of FUSE passthrough")
	transportFlag(fs, &cfg.FUSETransport, "auto serves /dev/fuse (volumes must survive plugin restarts, which a ring-served connection cannot); io-uring serves over io_uring where the kernel allows it, and a plugin restart then loses the volumes")
	fs.BoolVar(&cfg.FUSEDebug, "fuse-debug", false, "log every FUSE request (very verbose)")
	fs.BoolVar(&opts.provisioner, "provisioner", false, "provision the volumes of csi-memfs StorageClasses selected for this node, "+
		"and publish its CSIStorageCapacity (in-cluster API access; $POD_NAMESPACE, $POD_NAME, $POD_UID)")
	logFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(out, `Usage: csi-memfs serve [flags]

Runs the csi-memfs CSI node plugin: serves the CSI Identity and Node services
on --endpoint until SIGTERM or SIGINT. Published volumes survive a stop in
the journal under --state-dir; the next process unpublishes them. Images
named by volumes are pulled into the image cache (--image-cache-dir) and
shared by every volume of the node.

Flags:
`)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return cfg, opts, err
	}
	if fs.NArg() > 0 {
		return cfg, opts, fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	if cfg.NodeID == "" {
		return cfg, opts, errors.New("--node-id is required (or set NODE_NAME)")
	}
	return cfg, opts, nil
}

// quantity defines a flag holding a byte count written as a Kubernetes
// quantity (64Mi, 1Gi); def may be empty for 0.
func quantity(fs *flag.FlagSet, p *int64, name, def, usage string) {
	if def != "" {
		q := resource.MustParse(def)
		*p = q.Value()
	}
	fs.Func(name, usage+func() string {
		if def != "" {
			return " (default " + def + ")"
		}
		return ""
	}(), func(s string) error {
		q, err := resource.ParseQuantity(s)
		if err != nil || q.Sign() < 0 {
			return fmt.Errorf("want a quantity such as 64Mi or 8Gi")
		}
		*p = q.Value()
		return nil
	})
}

// versionString is buildVersion, or the main module's version.
func versionString() string {
	if buildVersion != "" {
		return buildVersion
	}
	if bi, ok := debug.ReadBuildInfo(); ok && bi.Main.Version != "" {
		return bi.Main.Version
	}
	return "unknown"
}

func runServe(args []string) int {
	cfg, opts, err := parseServeArgs(args, os.Stderr)
	if code, done := flagsDone("serve", err); done {
		return code
	}
	defer klog.Flush()
	d, err := driver.New(cfg)
	if err != nil {
		klog.ErrorS(err, "Cannot start")
		return 1
	}
	defer d.Close()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if opts.provisioner {
		if err := startProvisioner(ctx, d, cfg); err != nil {
			klog.ErrorS(err, "Cannot start the provisioner")
			return 1
		}
	}
	if err := d.Run(ctx); err != nil {
		klog.ErrorS(err, "Serving failed")
		return 1
	}
	klog.InfoS("Stopped")
	return 0
}

// registryFlags defines the flags of the registry policy image pulls
// follow, for serve and mount alike.
func registryFlags(fs *flag.FlagSet, insecure, allowed *[]string, caFile *string) {
	list := func(name, usage string, p *[]string) {
		fs.Func(name, usage, func(s string) error {
			if s == "" || strings.ContainsAny(s, "/ ") {
				return errors.New("want HOST or HOST:PORT")
			}
			*p = append(*p, s)
			return nil
		})
	}
	list("insecure-registry", "registry HOST[:PORT] that may be pulled from over plain HTTP or at a node-local address (loopback, link-local); repeatable; no other registry may", insecure)
	list("allow-registry", "registry HOST[:PORT] image volumes may pull from; repeatable; when given, only these (and --insecure-registry ones) may be pulled from (default: any public registry)", allowed)
	fs.StringVar(caFile, "registry-ca-file", "", "PEM file of CA certificates trusted for registries besides the system's")
}

// transportFlag defines --fuse-transport, checked as it is parsed.
func transportFlag(fs *flag.FlagSet, p *string, usage string) {
	*p = "auto"
	fs.Func("fuse-transport", "how FUSE requests reach this process: auto, io-uring or dev-fuse (default auto); "+usage, func(s string) error {
		if err := volume.CheckTransport(s); err != nil {
			return errors.New("want auto, io-uring or dev-fuse")
		}
		*p = s
		return nil
	})
}

// registryAccessFlags defines the flags of where image pulls find
// credentials and mirrors, for serve and mount alike.
func registryAccessFlags(fs *flag.FlagSet, nodeConfigs *[]string, mirrors *map[string][]string) {
	fs.Func("node-docker-config", "docker config file (config.json or .dockercfg) searched for the node's registry credentials, used when a volume's pull secret has none for the registry; repeatable, the first that exists is read (kubelet's: /var/lib/kubelet/config.json) (default: none)", func(s string) error {
		if !strings.HasPrefix(s, "/") {
			return errors.New("want an absolute path")
		}
		*nodeConfigs = append(*nodeConfigs, s)
		return nil
	})
	fs.Func("registry-mirror", "REGISTRY=MIRROR: pull REGISTRY's images from MIRROR (HOST[:PORT]) first, then from REGISTRY; repeatable, mirrors are tried in order; subject to --allow-registry and --insecure-registry", func(s string) error {
		reg, mirror, ok := strings.Cut(s, "=")
		if !ok || reg == "" || mirror == "" || strings.ContainsAny(s, "/ ") {
			return errors.New("want REGISTRY=MIRROR, each HOST or HOST:PORT")
		}
		if *mirrors == nil {
			*mirrors = map[string][]string{}
		}
		(*mirrors)[reg] = append((*mirrors)[reg], mirror)
		return nil
	})
}
