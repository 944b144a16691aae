// Package driver is the csi-memfs CSI node plugin: the Identity and Node
// services kubelet calls over a unix socket, the registry of published
// volumes with its on-disk journal, NodeGetVolumeStats, and the Prometheus
// collectors. Volumes are built and torn down by package volume; kubelet
// registration is package registrar's, which Run starts.
//
// # Volumes
//
// csi-memfs serves inline ephemeral volumes: kubelet invents a volume id
// per pod volume and calls NodePublishVolume with the pod's
// volumeAttributes, parsed once into a publishSpec (params.go). It serves
// volumes of its StorageClasses too (generic ephemeral volumes, claims):
// each node's plugin answers the controller service for its own node
// (controller.go), CreateVolume checks the class's parameters with the
// same parser and returns them as the volume_context NodePublishVolume
// reads back, marked provisioned; nothing is allocated until the publish.
// Publishing
// a volume (volumes.go)
//
//  1. for a volume with an image attribute, gets the image from the node's
//     image cache (pulling it if needed, with the pull secret of the
//     request) pinned; its imagePath directory is the volume's lower
//     directory (image.go),
//  2. reserves its size in the node budget (ResourceExhausted when full;
//     budget.go),
//  3. writes its journal record, <state>/volumes/<id>/volume.json, naming
//     the image's digest (journal.go),
//  4. builds the volume (volume.Build): a private tmpfs instance, the
//     memory layer, mounted on <state>/volumes/<id>/upper, laid over the
//     lower directory, its root given the volume_mount_group, and the seal
//     globs applied (they match files of the image: sealing one copies up
//     its metadata only), and
//  5. mounts it over FUSE on the target path (volume.Volume.Mount), which
//     must lie under <kubelet dir>/pods/, reached without a symlink, and
//     be no mount point already (target.go).
//
// Any failure undoes the steps already done, in reverse: a failed publish
// leaves nothing mounted, nothing reserved and no record. Unpublish runs the
// same steps backwards. Both are idempotent.
//
// # Restarts
//
// A volume's FUSE connection outlives the process serving it
// (restart.go, docs/restart.md). A new process started beside a running
// one takes every volume over from it through <state>/handover.sock (a
// planned upgrade: applications see a pause); a process started after a
// crash gets the volumes' sessions back from the holder (csi-memfs hold,
// on <state>/holder.sock), which every publish gives a copy to. Either way
// it rebuilds each volume from its journal record and its memory layer,
// still mounted under the state directory (volume.Adopt), and serves the
// connection from where it was left. A recorded volume with no session
// (no holder, or the holder restarted too) is registered as lost: it still
// holds its memory (counted in the budget and the metrics), unpublish
// cleans it (the dead target mount with mount-utils, then the memory
// layer), and NodeGetVolumeStats says it is lost. A volume whose journal
// record cannot be read is lost too, known by its id alone: its unpublish
// cleans the target path the request names. The image a recovered or
// lost volume was published with is pinned again (image.Cache.Open) before
// anything can collect it, and released by its unpublish.
//
// # Images
//
// The image cache (package image) is node-wide, under --image-cache-dir.
// A pull runs on the cache's own context: a publish whose deadline passes
// while its image is still being pulled fails with DeadlineExceeded, and
// kubelet's retry joins the same pull or finds the image cached; there is
// never a second pull of one image. Image errors map to codes once, in
// imageError.
//
// # Files
//
// From the top down, each referring only to those below it (but for the
// Driver's holder link, which is restart.go's):
//
//	run.go          New, Run: starting, serving, stopping
//	identity.go     the Identity service, health
//	stats.go        NodeGetVolumeStats
//	list.go         the volume list of `csi-memfs volumes`
//	controller.go   the Controller service: CreateVolume, GetCapacity, topology
//	node.go         the Node service's publish and unpublish, request checks
//	interceptor.go  request logs and metrics of every call
//	volumes.go      publish, unpublish, teardown
//	target.go       target paths: under kubelet's directory, no symlinks
//	restart.go      handover, takeover, the holder link
//	image.go        image volumes' lower directories; PullImage for mount
//	driver.go       Config, Driver, a volume's volume.Config
//	registry.go     the volumes and their locks
//	journal.go      the on-disk records
//	metrics.go      the Prometheus collectors
//	budget.go       the node's memory budget and volume count
//	params.go       the typed request: volumeAttributes, publishSpec
//	errors.go       coded errors and their gRPC status
//
// # Lock order
//
//	registry.locks[volume id]  one operation per volume at a time; held across I/O
//	  entry.mu                 a volume's Volume and image (readers: stats, metrics)
//	    registry.mu            the volume map; a leaf, never held across I/O
//
// registry.locksMu is a leaf held only to find a volume's lock. restart.go
// states where a handover and the holder link fit in.
//
// There is no driver-wide lock on the publish path: the budget is reserved
// with atomic operations, and publishes of different volumes run in
// parallel.
//
// # Errors
//
// Inside the package errors are wrapped with fmt.Errorf; a coded error
// (errorf) carries the gRPC code the RPC answers with. Each handler converts
// once, with toStatus; any other error becomes Internal.
package driver

import (
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"k8s.io/mount-utils"

	"github.com/csi-memfs/csi-memfs/image"
	"github.com/csi-memfs/csi-memfs/volume"
)

// DefaultDriverName is the CSI driver name when Config.DriverName is empty.
const DefaultDriverName = "memfs.csi.dev"

// DefaultKubeletDir is Config.KubeletDir when empty.
const DefaultKubeletDir = "/var/lib/kubelet"

// Bounds on a volume that apply when the operator sets none.
const (
	// DefaultMaxVolumeSize is Config.MaxVolumeSize without a budget.
	DefaultMaxVolumeSize = 1 << 30
	// DefaultMaxVolumeInodes is Config.MaxVolumeInodes when 0.
	DefaultMaxVolumeInodes = 1_000_000
)

// Config configures a Driver. cmd/csi-memfs fills it from flags.
type Config struct {
	// DriverName is the name kubelet knows the plugin by (CSIDriver
	// metadata.name). Default DefaultDriverName.
	DriverName string
	// Version is reported by GetPluginInfo.
	Version string
	// NodeID is the node's id, normally the Kubernetes node name. Required.
	NodeID string
	// Endpoint is the gRPC endpoint, unix:///path/to/csi.sock (or a plain
	// absolute path). Required by Run.
	Endpoint string
	// StateDir holds the journal and the volumes' memory layers. Required.
	StateDir string
	// MetricsAddress is the listen address of /metrics and /healthz, e.g.
	// ":9809"; empty disables them.
	MetricsAddress string
	// KubeletRegistrationPath is the CSI socket's path as kubelet sees it
	// on the host. When set, the plugin registers itself with kubelet (no
	// node-driver-registrar sidecar) on a socket in RegistrationDir.
	KubeletRegistrationPath string
	// RegistrationDir is kubelet's plugins_registry directory as this
	// process sees it. Default "/registration".
	RegistrationDir string
	// KubeletDir is kubelet's root directory as this process sees it:
	// target paths must lie under its pods/ directory, and no component
	// below it may be a symlink. Default DefaultKubeletDir.
	KubeletDir string

	// DefaultVolumeSize is the size of a volume without a size attribute.
	// Default 64 MiB.
	DefaultVolumeSize int64
	// MaxVolumeSize bounds a volume's size attribute. Default: the budget,
	// or DefaultMaxVolumeSize without one.
	MaxVolumeSize int64
	// DefaultVolumeInodes is the inode limit of a volume without an inodes
	// attribute; 0: one per 4 KiB of size, at least 1024 (and at most
	// MaxVolumeInodes).
	DefaultVolumeInodes uint64
	// MaxVolumeInodes bounds a volume's inode limit, which tmpfs charges
	// outside its size. Default DefaultMaxVolumeInodes.
	MaxVolumeInodes uint64
	// NodeBudget is the memory all volumes on the node may hold together
	// (the sum of their sizes); 0: no budget.
	NodeBudget int64
	// MaxVolumes is the number of volumes the node serves at once, reported
	// to kubelet as max_volumes_per_node; 0: no limit.
	MaxVolumes int64

	// ImageCacheDir holds the node's image cache (image lower layers).
	// Default <StateDir>/images.
	ImageCacheDir string
	// ImageCacheBudget is the disk the image cache keeps itself under by
	// collecting images no volume uses; 0: no limit.
	ImageCacheBudget int64
	// InsecureRegistries lists registries ("host" or "host:port") that may
	// be pulled from over plain HTTP, or at a node-local address
	// (loopback, link-local); no other registry may.
	InsecureRegistries []string
	// AllowedRegistries, if not empty, lists the only registries image
	// volumes may pull from (besides InsecureRegistries).
	AllowedRegistries []string
	// RegistryCAFile is a PEM file of CA certificates trusted for
	// registries besides the system's; empty: none.
	RegistryCAFile string
	// NodeDockerConfigs is the search list of the node's docker config
	// files (config.json or .dockercfg); the first that exists gives
	// credentials for registries a volume's pull secret has none for.
	NodeDockerConfigs []string
	// CredentialProviderConfig and CredentialProviderBinDir are kubelet's
	// --image-credential-provider-config and -bin-dir: exec plugins asked
	// for credentials after NodeDockerConfigs. Empty: none.
	CredentialProviderConfig string
	CredentialProviderBinDir string
	// RegistryMirrors maps a registry to mirrors tried in order before it.
	RegistryMirrors map[string][]string
	// ImageMaxFiles and ImageMaxPathLength bound one image's entries and
	// the length of a path in it (0: image's defaults); ImageDiskReserve
	// is the free disk flattening leaves (0: the smaller of 1Gi and 5% of
	// the disk).
	ImageMaxFiles      int64
	ImageMaxPathLength int
	ImageDiskReserve   int64
	// LocalImagesDir holds the local images an image attribute names as
	// "oci:NAME" (OCI image layouts or image tarballs); empty: none.
	LocalImagesDir string
	// ImagePullProgressInterval is how often a running pull logs a
	// progress line (not at all for shorter pulls). Default 5 s.
	ImagePullProgressInterval time.Duration
	// imageNoSync skips the image cache's syncfs (tests only).
	imageNoSync bool
	// registrationRetry is registrar.Config.Retry (tests only).
	registrationRetry time.Duration

	// HandoverWait is how long a process told to stop waits for a
	// successor to take its volumes over before it stops serving them
	// (the holder keeps them then). A deleted or evicted plugin pod has
	// its replacement started at once, but its holder goes with it; 0
	// waits for none.
	HandoverWait time.Duration

	// DisablePassthrough serves every read and write through the daemon.
	DisablePassthrough bool
	// FUSETransport is volume.Config.Transport for every volume: "auto"
	// (or empty) serves /dev/fuse, since every volume may be handed to a
	// successor; "io-uring" serves the ring where the kernel allows it,
	// and then a restart of the plugin loses the volumes.
	FUSETransport string
	// FUSEDebug logs every FUSE request (very verbose).
	FUSEDebug bool
}

// withDefaults returns c with defaults filled in, or an error naming the
// first bad field.
func (c Config) withDefaults() (Config, error) {
	if c.DriverName == "" {
		c.DriverName = DefaultDriverName
	}
	if c.RegistrationDir == "" {
		c.RegistrationDir = "/registration"
	}
	if c.KubeletDir == "" {
		c.KubeletDir = DefaultKubeletDir
	}
	c.KubeletDir = filepath.Clean(c.KubeletDir)
	if c.DefaultVolumeSize == 0 {
		c.DefaultVolumeSize = 64 << 20
	}
	if c.MaxVolumeSize == 0 {
		c.MaxVolumeSize = DefaultMaxVolumeSize
		if c.NodeBudget > 0 {
			c.MaxVolumeSize = c.NodeBudget
		}
	}
	if c.MaxVolumeInodes == 0 {
		c.MaxVolumeInodes = DefaultMaxVolumeInodes
	}
	switch {
	case c.NodeID == "":
		return c, errors.New("node id is required (--node-id)")
	case !filepath.IsAbs(c.KubeletDir):
		return c, fmt.Errorf("kubelet directory %q must be an absolute path (--kubelet-dir)", c.KubeletDir)
	case c.StateDir == "" || !filepath.IsAbs(c.StateDir):
		return c, fmt.Errorf("state directory %q must be an absolute path (--state-dir)", c.StateDir)
	case c.DefaultVolumeSize < 0 || c.MaxVolumeSize < 0 || c.NodeBudget < 0 || c.MaxVolumes < 0:
		return c, errors.New("sizes, budget and volume counts must not be negative")
	case c.DefaultVolumeSize > c.MaxVolumeSize:
		return c, fmt.Errorf("default volume size %d is more than the maximum %d (--default-volume-size, --max-volume-size)",
			c.DefaultVolumeSize, c.MaxVolumeSize)
	case c.ImageCacheBudget < 0:
		return c, errors.New("the image cache budget must not be negative (--image-cache-budget)")
	case c.ImageCacheDir != "" && !filepath.IsAbs(c.ImageCacheDir):
		return c, fmt.Errorf("image cache directory %q must be an absolute path (--image-cache-dir)", c.ImageCacheDir)
	case c.LocalImagesDir != "" && !filepath.IsAbs(c.LocalImagesDir):
		return c, fmt.Errorf("local images directory %q must be an absolute path (--local-images)", c.LocalImagesDir)
	case c.DefaultVolumeSize > 0 && c.DefaultVolumeSize < minVolumeSize:
		return c, fmt.Errorf("default volume size %d is less than the minimum %s (--default-volume-size)",
			c.DefaultVolumeSize, quantityString(minVolumeSize))
	case c.DefaultVolumeInodes > c.MaxVolumeInodes:
		return c, fmt.Errorf("default inodes %d is more than the maximum %d (--default-volume-inodes, --max-volume-inodes)",
			c.DefaultVolumeInodes, c.MaxVolumeInodes)
	}
	return c, nil
}

// limits returns the bounds on volumeAttributes.
func (c *Config) limits() limits {
	return limits{
		DefaultSize:   c.DefaultVolumeSize,
		MaxSize:       c.MaxVolumeSize,
		DefaultInodes: c.DefaultVolumeInodes,
		MaxInodes:     c.MaxVolumeInodes,
	}
}

// Driver is the node plugin. Create it with New, serve it with Run.
type Driver struct {
	csi.UnimplementedIdentityServer
	csi.UnimplementedNodeServer
	csi.UnimplementedControllerServer

	// cfg is the configuration, defaults filled in. Immutable.
	cfg Config
	// journal records published volumes. Immutable.
	journal journal
	// vols is the registry of volumes. Immutable pointer.
	vols *registry
	// budget holds the node's reservations. Immutable pointer.
	budget *budget
	// metrics are the Prometheus collectors. Immutable pointer.
	metrics *metrics
	// images is the node's image cache. Immutable pointer.
	images *image.Cache
	// fds is the descriptor budget all volumes' memory layers share, so
	// that many volumes stay within the process's open-file limit.
	// Immutable pointer.
	fds *volume.FdBudget
	// mounter cleans target paths (mount-utils). Immutable.
	mounter mount.Interface
	// created remembers CreateVolume's answers (controller.go).
	created created
	// ready is true once the journal is recovered. Accessed atomically.
	ready atomic.Bool
	// holder keeps the holder's copies of the volumes' sessions.
	// Immutable pointer.
	holder *holderLink
	// handingOver is set once a successor takes the volumes over: Node
	// calls are refused from then on. Accessed atomically.
	handingOver atomic.Bool
	// rpcMu is held for reading by every Node call, and for writing by a
	// handover, which so waits for the calls in flight.
	rpcMu sync.RWMutex
}

// volumeConfig describes volume id as spec asks, over the lower directory
// lower (empty for none), for volume.Build and volume.Adopt.
func (d *Driver) volumeConfig(id string, spec publishSpec, lower string) volume.Config {
	return volume.Config{
		ID:                 id,
		Upper:              d.journal.upperDir(id),
		Size:               spec.Params.Size,
		Inodes:             spec.Params.Inodes,
		NoSwap:             spec.Params.NoSwap,
		Fds:                d.fds,
		Lower:              lower,
		SharedRoot:         true,
		MountGroup:         spec.MountGroup,
		Seal:               spec.Params.Seal,
		Target:             spec.TargetPath,
		ReadOnly:           spec.ReadOnly,
		KernelCache:        spec.Params.KernelCache,
		DisablePassthrough: d.cfg.DisablePassthrough,
		Transport:          d.cfg.FUSETransport,
		Observer:           d.metrics.fuse,
		Debug:              d.cfg.FUSEDebug,
	}
}
