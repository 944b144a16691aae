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
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-memfs/csi-memfs/handoff"
	"github.com/csi-memfs/csi-memfs/image"
	"github.com/csi-memfs/csi-memfs/registrar"
	"github.com/csi-memfs/csi-memfs/volume"
)

// holderCheckPeriod is how often the holder connection is checked.
const holderCheckPeriod = 2 * time.Second

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
		fds:     volume.ProcessFdBudget(),
		mounter: mount.New(""),
		holder:  &holderLink{path: filepath.Join(cfg.StateDir, holderSocket)},
	}
	d.metrics = newMetrics(d.vols.samples, d.budget, cfg.KubeletRegistrationPath != "")
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
	d.metrics.images = d.images
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
	// A successor takes the volumes over through hlis (restart.go).
	hlis, err := handoff.Listen(filepath.Join(d.cfg.StateDir, handoverSocket))
	if err != nil {
		lis.Close()
		return fmt.Errorf("handover socket: %w", err)
	}
	handedOver := make(chan struct{})
	go d.serveHandover(ctx, hlis, handedOver)
	holdCtx, stopHolding := context.WithCancel(ctx)
	holdDone := make(chan struct{})
	go func() { d.holder.keep(holdCtx, d.vols, holderCheckPeriod); close(holdDone) }()

	srv := grpc.NewServer(grpc.UnaryInterceptor(d.interceptor))
	csi.RegisterIdentityServer(srv, d)
	csi.RegisterNodeServer(srv, d)
	csi.RegisterControllerServer(srv, d)

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
		hsrv = &http.Server{Handler: d.metrics.handler(d.healthy, d.serveVolumes), ReadHeaderTimeout: 10 * time.Second}
		go func() {
			if err := hsrv.Serve(mlis); err != nil && !errors.Is(err, http.ErrServerClosed) {
				errc <- fmt.Errorf("metrics server: %w", err)
			}
		}()
		logger.Info("Serving metrics", "address", mlis.Addr().String())
		// `csi-memfs volumes` finds the metrics server by this file.
		af, err := writeMetricsAddress(d.cfg.StateDir, dialable(mlis.Addr()))
		if err != nil {
			logger.Error(err, "Cannot record the metrics address; csi-memfs volumes needs --metrics-address", "file", MetricsAddressFile)
		}
		defer func() {
			if err := af.remove(); err != nil {
				logger.Error(err, "Cannot remove the metrics address file", "file", MetricsAddressFile)
			}
		}()
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
		bundles, _ := d.stopAll(ctx)
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
