// Package driver is the csi-memfs CSI node plugin: the Identity and Node
// services kubelet calls over a unix socket, the registry of published
// volumes with its on-disk journal, NodeGetVolumeStats, and the Prometheus
// collectors. Kubelet registration is package registrar's, which Run
// starts.
//
// # Volumes
//
// csi-memfs serves only inline ephemeral volumes: kubelet invents a volume
// id per pod volume and calls NodePublishVolume with the pod's
// volumeAttributes (params.go). Publishing a volume
//
//  1. for a volume with an image attribute, gets the image from the node's
//     image cache (pulling it if needed, with the pull secret of the
//     request) pinned, and opens its imagePath directory as the lower
//     layer (image.go),
//  2. reserves its size in the node budget (ResourceExhausted when full),
//  3. writes its journal record, <state>/volumes/<id>/volume.json, naming
//     the image's digest,
//  4. mounts a private tmpfs instance, the memory layer, on
//     <state>/volumes/<id>/upper (memfs.New),
//  5. builds the tree to serve: the memory layer alone, or an overlay of
//     it over the image's lower layer (Driver.buildTree),
//  6. applies the volume_mount_group and the seal globs (which match
//     files of the image: sealing one copies up its metadata only), and
//  7. mounts it over FUSE on the target path (fusefs.Mount).
//
// Any failure undoes the steps already done, in reverse: a failed publish
// leaves nothing mounted, nothing reserved and no record. Unpublish runs the
// same steps backwards. Both are idempotent.
//
// # Restarts
//
// A volume's FUSE connection outlives the process serving it
// (handover.go, docs/restart.md). A new process started beside a running
// one takes every volume over from it through <state>/handover.sock (a
// planned upgrade: applications see a pause); a process started after a
// crash gets the volumes' sessions back from the holder (csi-memfs hold,
// on <state>/holder.sock), which every publish gives a copy to. Either way
// it rebuilds each volume from its journal record and its memory layer,
// still mounted under the state directory, and serves the connection from
// where it was left. A recorded volume with no session (no holder, or the
// holder restarted too) is registered as lost: it still holds its memory
// (counted in the budget and the metrics), unpublish cleans it (the dead
// target mount with mount-utils, then the memory layer), and
// NodeGetVolumeStats says it is lost. The image a recovered or lost
// volume was published with is pinned again (image.Cache.Open) before
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
// # Lock order
//
//	registry.locks[volume id]  one operation per volume at a time; held across I/O
//	  volume.mu                a volume's layer and server (readers: stats, metrics)
//	    registry.mu            the volume map; a leaf, never held across I/O
//
// registry.locksMu is a leaf held only to find a volume's lock.
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
	"context"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-memfs/csi-memfs/handoff"
	"github.com/csi-memfs/csi-memfs/image"
	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/registrar"
)

// DefaultDriverName is the CSI driver name when Config.DriverName is empty.
const DefaultDriverName = "memfs.csi.dev"

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

	// DefaultVolumeSize is the size of a volume without a size attribute.
	// Default 64 MiB.
	DefaultVolumeSize int64
	// MaxVolumeSize bounds a volume's size attribute. Default: the budget,
	// or 1 TiB without one.
	MaxVolumeSize int64
	// DefaultVolumeInodes is the inode limit of a volume without an inodes
	// attribute; 0: one per 4 KiB of size, at least 1024.
	DefaultVolumeInodes uint64
	// MaxVolumeInodes bounds a volume's inodes attribute; 0: no bound.
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
	// be pulled from over plain HTTP; loopback registries always may.
	InsecureRegistries []string
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
	if c.DefaultVolumeSize == 0 {
		c.DefaultVolumeSize = 64 << 20
	}
	if c.MaxVolumeSize == 0 {
		c.MaxVolumeSize = 1 << 40
		if c.NodeBudget > 0 {
			c.MaxVolumeSize = c.NodeBudget
		}
	}
	switch {
	case c.NodeID == "":
		return c, errors.New("node id is required (--node-id)")
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
	case c.MaxVolumeInodes > 0 && c.DefaultVolumeInodes > c.MaxVolumeInodes:
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
	fds *memfs.FdBudget
	// mounter cleans target paths (mount-utils). Immutable.
	mounter mount.Interface
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

// holderCheckPeriod is how often the holder connection is checked.
const holderCheckPeriod = 2 * time.Second

// cachedFdBudget is how many descriptors the memory layers may keep cached
// between them: half the open-file limit (Go raises the soft limit to the
// hard one at start), leaving the rest to open files, sockets, the FUSE
// devices and the image cache.
func cachedFdBudget() int {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<20 {
		return 1 << 19
	}
	return int(rl.Cur / 2)
}

// New checks cfg, creates the state directory, opens the image cache and
// recovers the volumes the journal records (see "Restarts" in the package
// doc). Close the Driver when done.
func New(cfg Config) (*Driver, error) {
	cfg, err := cfg.withDefaults()
	if err != nil {
		return nil, err
	}
	d := &Driver{
		cfg:     cfg,
		journal: journal{dir: filepath.Join(cfg.StateDir, "volumes")},
		vols:    newRegistry(),
		budget:  &budget{limit: cfg.NodeBudget, maxVolumes: cfg.MaxVolumes},
		fds:     memfs.NewFdBudget(cachedFdBudget()),
		mounter: mount.New(""),
		holder:  &holderLink{path: filepath.Join(cfg.StateDir, holderSocket)},
	}
	d.metrics = newMetrics(d)
	if err := os.MkdirAll(d.journal.dir, 0o700); err != nil {
		return nil, fmt.Errorf("state directory: %w", err)
	}
	logger := klog.Background()
	// A running predecessor hands its volumes over first, and lets go of
	// the image cache on the way.
	t := d.takeSessions(logger)
	if d.images, err = d.openImageCache(logger); err != nil {
		t.close()
		return nil, fmt.Errorf("image cache: %w", err)
	}
	// Before anything can collect an image: re-pin those of recovered
	// volumes.
	if err := d.recover(logger, t); err != nil {
		d.images.Close()
		return nil, err
	}
	d.ready.Store(true)
	return d, nil
}

// openImageCache opens the image cache, waiting while another process
// holds it: a predecessor lets go of it as it hands over.
func (d *Driver) openImageCache(logger logr.Logger) (*image.Cache, error) {
	deadline := time.Now().Add(handoverTimeout)
	for logged := false; ; logged = true {
		c, err := newImageCache(&d.cfg, d.metrics, logger)
		if err == nil || !errors.Is(err, unix.EWOULDBLOCK) || time.Now().After(deadline) {
			return c, err
		}
		if !logged {
			logger.Info("Waiting for another plugin process to let go of the image cache", "err", err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

// Close stops the image pulls still running and releases the image cache.
// Published volumes are left as Run leaves them.
func (d *Driver) Close() error {
	return d.images.Close()
}

// Run serves the CSI services on cfg.Endpoint and the metrics on
// cfg.MetricsAddress until ctx is done, then stops gracefully: in-flight
// requests finish (for at most 10 s). Published volumes are left as they
// are; a successor process finds them in the journal.
func (d *Driver) Run(ctx context.Context) error {
	logger := klog.FromContext(ctx)
	lis, sockPath, ours, err := listenEndpoint(d.cfg.Endpoint)
	if err != nil {
		return err
	}
	handed := false
	defer func() {
		if !handed { // else the path is the successor's
			handoff.RemoveSocket(sockPath, ours)
		}
	}()
	// A successor takes the volumes over through hlis (handover.go).
	hlis, err := handoff.Listen(filepath.Join(d.cfg.StateDir, handoverSocket))
	if err != nil {
		lis.Close()
		return fmt.Errorf("handover socket: %w", err)
	}
	handedOver := make(chan struct{})
	go d.serveHandover(ctx, hlis, handedOver)
	holdCtx, stopHolding := context.WithCancel(ctx)
	holdDone := make(chan struct{})
	go func() { d.holder.keep(holdCtx, d, holderCheckPeriod); close(holdDone) }()

	srv := grpc.NewServer(grpc.UnaryInterceptor(d.interceptor))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterNodeServer(srv, d)

	errc := make(chan error, 3) // CSI, metrics and registration servers
	go func() { errc <- srv.Serve(lis) }()

	var hsrv *http.Server
	if d.cfg.MetricsAddress != "" {
		// SO_REUSEPORT: during a rollout the successor, on the host
		// network too, listens beside this process.
		lc := net.ListenConfig{Control: func(_, _ string, c syscall.RawConn) error {
			var serr error
			c.Control(func(fd uintptr) { serr = unix.SetsockoptInt(int(fd), unix.SOL_SOCKET, unix.SO_REUSEPORT, 1) })
			return serr
		}}
		mlis, err := lc.Listen(context.Background(), "tcp", d.cfg.MetricsAddress)
		if err != nil {
			srv.Stop()
			hlis.Close()
			stopHolding()
			<-holdDone
			return fmt.Errorf("metrics address: %w", err)
		}
		hsrv = &http.Server{Handler: d.metrics.handler(), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hsrv.Serve(mlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics server: %w", err)
			}
		}()
		logger.Info("Serving metrics", "address", mlis.Addr().String())
	}
	logger.Info("Serving CSI", "endpoint", sockPath, "driver", d.cfg.DriverName, "version", d.cfg.Version, "nodeID", d.cfg.NodeID)

	// Register with kubelet only once the CSI socket answers: kubelet
	// calls it as soon as registration succeeds.
	regCtx, stopRegistration := context.WithCancel(ctx)
	regDone := make(chan struct{})
	if d.cfg.KubeletRegistrationPath != "" {
		go func() {
			defer close(regDone)
			err := registrar.Serve(regCtx, registrar.Config{
				DriverName:      d.cfg.DriverName,
				KubeletEndpoint: d.cfg.KubeletRegistrationPath,
				SocketPath:      filepath.Join(d.cfg.RegistrationDir, registrar.SocketName(d.cfg.DriverName)),
				OnStatus:        d.metrics.observeRegistration,
				Retry:           d.cfg.registrationRetry,
			})
			if err != nil {
				errc <- err
			}
		}()
	} else {
		close(regDone)
	}

	select {
	case <-ctx.Done():
		handed = d.awaitSuccessor(logger, handedOver)
	case err = <-errc:
	case <-handedOver:
		handed = true
	}
	hlis.Close()
	stopHolding()
	<-holdDone
	logger.Info("Stopping", "volumes", d.vols.len(), "handedOver", handed)
	// Unregister first, so kubelet sends nothing more while we stop.
	stopRegistration()
	<-regDone
	stopped := make(chan struct{})
	go func() { srv.GracefulStop(); close(stopped) }()
	select {
	case <-stopped:
	case <-time.After(10 * time.Second):
		srv.Stop()
	}
	if handed {
		// Exiting now would have the container restarted, and it would
		// take the volumes back: wait to be stopped.
		logger.Info("Every volume is served by the successor; waiting to be stopped")
		<-ctx.Done()
	} else {
		// Answer what was read, and leave the connections to the holder
		// (or, with none, to die with this process).
		bundles := d.stopAll(ctx)
		for _, b := range bundles {
			b.Close()
		}
		logger.Info("Stopped serving the volumes", "volumes", len(bundles))
	}
	if hsrv != nil {
		sctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		hsrv.Shutdown(sctx)
		cancel()
	}
	return err
}

// listenEndpoint listens on a unix socket endpoint, unix:///path or /path
// (handoff.ListenUnix: a successor binds the same path while this process
// still serves), and returns the path and the socket's stamp.
func listenEndpoint(endpoint string) (net.Listener, string, handoff.Stamp, error) {
	p, ok := strings.CutPrefix(endpoint, "unix://")
	if !ok && !strings.HasPrefix(endpoint, "/") {
		return nil, "", handoff.Stamp{}, fmt.Errorf("endpoint %q: want unix:///path/to/csi.sock", endpoint)
	}
	if !ok {
		p = endpoint
	}
	if !filepath.IsAbs(p) {
		return nil, "", handoff.Stamp{}, fmt.Errorf("endpoint %q: want an absolute socket path, unix:///path/to/csi.sock", endpoint)
	}
	lis, stamp, err := handoff.ListenUnix("unix", p)
	if err != nil {
		return nil, "", handoff.Stamp{}, fmt.Errorf("endpoint: %w", err)
	}
	return lis, p, stamp, nil
}

// fuseUsable reports why FUSE cannot be served, or nil: /dev/fuse must open
// read-write (the device exists and we may use it).
func fuseUsable() error {
	fd, err := unix.Open("/dev/fuse", unix.O_RDWR|unix.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("cannot open /dev/fuse: %w; csi-memfs needs the /dev/fuse device and CAP_SYS_ADMIN", err)
	}
	unix.Close(fd)
	return nil
}

// codedError is an error with the gRPC code its RPC answers with.
type codedError struct {
	code codes.Code
	msg  string
}

func (e *codedError) Error() string { return e.msg }

// errorf returns an error that toStatus answers with code.
func errorf(code codes.Code, format string, args ...any) error {
	return &codedError{code: code, msg: fmt.Sprintf(format, args...)}
}

// toStatus converts a handler's error to a gRPC status, once: the code of
// the coded error inside, DeadlineExceeded or Canceled for a context's
// error, else Internal. The message is the whole wrapped error.
func toStatus(err error) error {
	var ce *codedError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &ce):
		return status.Error(ce.code, err.Error())
	case errors.Is(err, context.DeadlineExceeded):
		return status.Error(codes.DeadlineExceeded, err.Error())
	case errors.Is(err, context.Canceled):
		return status.Error(codes.Canceled, err.Error())
	}
	return status.Error(codes.Internal, err.Error())
}

// isNotExist reports an error meaning a path does not exist.
func isNotExist(err error) bool {
	return errors.Is(err, os.ErrNotExist) || errors.Is(err, syscall.ENOENT)
}
