// Package registrar registers a CSI node plugin with kubelet, in process:
// it serves kubelet's plugin-registration API on a socket in kubelet's
// plugins_registry directory, as kubernetes-csi's node-driver-registrar
// sidecar does, so that the plugin's pod needs one container.
//
// kubelet discovers node plugins by watching its plugins_registry directory
// (<kubelet-dir>/plugins_registry) for unix sockets. For each new socket it
// calls Registration.GetInfo, checks the answer, dials the CSI endpoint the
// answer names, and reports the outcome with NotifyRegistrationStatus. When
// the socket goes away, kubelet unregisters the plugin.
//
// Serve serves that small API. The chart has no sidecar mode: a
// node-driver-registrar removes the shared socket when it stops, which
// during a rolling update (maxSurge 1) unregisters the successor too.
package registrar

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"sync/atomic"
	"time"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"

	"github.com/csi-memfs/csi-memfs/handoff"
)

// supportedCSIVersions are the CSI spec versions kubelet may speak to the
// plugin.
var supportedCSIVersions = []string{"1.0.0"}

// Config configures Serve.
type Config struct {
	// DriverName is the CSI driver name kubelet registers. Required.
	DriverName string
	// KubeletEndpoint is the CSI socket's path as kubelet sees it on the
	// host, e.g. /var/lib/kubelet/plugins/memfs.csi.dev/csi.sock, which
	// differs from the path inside the plugin's container. Required,
	// absolute.
	KubeletEndpoint string
	// SocketPath is where the registration socket is created: the
	// plugins_registry directory as this process sees it, joined with
	// SocketName(DriverName). Required, absolute.
	SocketPath string
	// OnStatus, if set, is called with every status kubelet reports:
	// registered or not, and kubelet's error message when not.
	OnStatus func(registered bool, message string)
	// Retry is how long Serve waits before offering the registration
	// again after kubelet refused it, doubling on each refusal up to a
	// minute. Default 1 s.
	Retry time.Duration
	// CheckPeriod is how often Serve checks that its socket is still in
	// place. Default 5 s.
	CheckPeriod time.Duration
}

// SocketName is the name of the registration socket in kubelet's
// plugins_registry directory: <driver>-reg.sock, as node-driver-registrar
// names it.
func SocketName(driverName string) string {
	return driverName + "-reg.sock"
}

func (c Config) validate() error {
	switch {
	case c.DriverName == "":
		return errors.New("registration: driver name is required")
	case c.KubeletEndpoint == "" || !filepath.IsAbs(c.KubeletEndpoint):
		return fmt.Errorf("registration: kubelet endpoint %q must be an absolute path (--kubelet-registration-path)", c.KubeletEndpoint)
	case c.SocketPath == "" || !filepath.IsAbs(c.SocketPath):
		return fmt.Errorf("registration: socket path %q must be an absolute path (--registration-dir)", c.SocketPath)
	}
	return nil
}

// The defaults of Config.Retry and Config.CheckPeriod, and the longest
// wait between offers.
const (
	defaultRetry       = time.Second
	defaultCheckPeriod = 5 * time.Second
	retryMax           = time.Minute
)

// withDefaults returns c with defaults filled in.
func (c Config) withDefaults() Config {
	if c.Retry <= 0 {
		c.Retry = defaultRetry
	}
	if c.CheckPeriod <= 0 {
		c.CheckPeriod = defaultCheckPeriod
	}
	return c
}

// Serve serves kubelet's plugin-registration API on
// cfg.SocketPath until ctx is done, then removes the socket (kubelet then
// unregisters the plugin) and returns nil. A stale socket left by a
// previous process is replaced. It returns an error when cfg is invalid or
// the socket cannot be created or served.
//
// kubelet tries a socket once: when it refuses the registration (its
// NodeGetInfo call failed, say) it never asks again, and when the socket
// file goes away it unregisters the plugin for good. node-driver-registrar
// answers the first by exiting, so that its restart offers a new socket;
// Serve offers a new socket itself, after a back-off. It also
// puts the socket back when it has been removed from under it (found
// missing on two checks in a row). A socket replaced by another one is a
// successor's (a handover): it is left alone.
func Serve(ctx context.Context, cfg Config) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	cfg = cfg.withDefaults()
	logger := klog.FromContext(ctx).WithValues("socket", cfg.SocketPath)
	retry := cfg.Retry
	offer, err := offerRegistration(cfg, logger)
	if err != nil {
		return err
	}
	for {
		logger.Info("Serving kubelet plugin registration", "driver", cfg.DriverName, "endpoint", cfg.KubeletEndpoint)
		again, err := offer.wait(ctx, retry, cfg.CheckPeriod)
		if err != nil || !again {
			offer.stop()
			return err
		}
		switch {
		case offer.refused.Load():
			retry = min(2*retry, retryMax)
		case offer.registered.Load():
			retry = cfg.Retry
		}
		// The new socket takes the path in one step; the old one's
		// server then stops, its file already gone.
		next, err := offerRegistration(cfg, logger)
		offer.srv.Stop()
		if err != nil {
			return err
		}
		offer = next
	}
}

// registrationOffer is one registration socket and the server behind it.
type registrationOffer struct {
	path string
	// ours identifies the socket file this offer bound.
	ours handoff.Stamp
	srv  *grpc.Server
	// served receives Serve's result.
	served chan error
	// refused is set, and refusedc signalled, when kubelet refuses the
	// registration; kubelet will not try this socket again.
	refused  atomic.Bool
	refusedc chan struct{}
	// registered is set when kubelet accepts the registration.
	registered atomic.Bool
}

// offerRegistration binds cfg.SocketPath and serves the registration API
// on it.
func offerRegistration(cfg Config, logger klog.Logger) (*registrationOffer, error) {
	lis, ours, err := handoff.ListenUnix("unix", cfg.SocketPath)
	if err != nil {
		return nil, fmt.Errorf("registration socket: %w", err)
	}
	o := &registrationOffer{
		path:     cfg.SocketPath,
		ours:     ours,
		srv:      grpc.NewServer(),
		served:   make(chan error, 1),
		refusedc: make(chan struct{}, 1),
	}
	registerapi.RegisterRegistrationServer(o.srv, &registrationServer{cfg: cfg, logger: logger, offer: o})
	go func() { o.served <- o.srv.Serve(lis) }()
	return o, nil
}

// wait returns when the offer should end: with again set when a new socket
// should be offered (kubelet refused this one, and retry has passed; or the
// socket was removed, as found by checks every period), with an error when
// the server failed, and with neither when ctx is done.
func (o *registrationOffer) wait(ctx context.Context, retry, period time.Duration) (again bool, err error) {
	tick := time.NewTicker(period)
	defer tick.Stop()
	missing := 0
	for {
		select {
		case <-ctx.Done():
			return false, nil
		case err := <-o.served:
			return false, fmt.Errorf("registration server: %w", err)
		case <-o.refusedc:
			klog.FromContext(ctx).Info("Offering the registration again", "socket", o.path, "after", retry)
			select {
			case <-ctx.Done():
				return false, nil
			case <-time.After(retry):
				return true, nil
			}
		case <-tick.C:
			switch id := handoff.StampAt(o.path); {
			case id == o.ours:
				missing = 0
			case id != (handoff.Stamp{}):
				missing = 0 // a successor's: not ours to fight over
			default:
				if missing++; missing == 2 {
					klog.FromContext(ctx).Info("Registration socket was removed; offering it again", "socket", o.path)
					return true, nil
				}
			}
		}
	}
}

// stop removes the socket first (kubelet unregisters as soon as it
// disappears, before this process stops answering CSI calls; a successor's
// socket there stays), then stops the server.
func (o *registrationOffer) stop() {
	handoff.RemoveSocket(o.path, o.ours)
	o.srv.Stop()
}

// registrationServer answers kubelet's registration calls.
type registrationServer struct {
	registerapi.UnimplementedRegistrationServer

	// cfg is the validated configuration. Immutable.
	cfg Config
	// logger carries the socket path. Immutable.
	logger klog.Logger
	// offer is the socket this server answers on.
	offer *registrationOffer
	// mu serializes OnStatus calls.
	mu sync.Mutex
}

// GetInfo tells kubelet what the plugin is and where its CSI socket is.
func (s *registrationServer) GetInfo(context.Context, *registerapi.InfoRequest) (*registerapi.PluginInfo, error) {
	s.logger.V(2).Info("Kubelet asked for plugin info")
	return &registerapi.PluginInfo{
		Type:              registerapi.CSIPlugin,
		Name:              s.cfg.DriverName,
		Endpoint:          s.cfg.KubeletEndpoint,
		SupportedVersions: append([]string(nil), supportedCSIVersions...),
	}, nil
}

// NotifyRegistrationStatus logs kubelet's verdict.
func (s *registrationServer) NotifyRegistrationStatus(_ context.Context, st *registerapi.RegistrationStatus) (*registerapi.RegistrationStatusResponse, error) {
	if st.GetPluginRegistered() {
		s.logger.Info("Registered with kubelet", "driver", s.cfg.DriverName)
		s.offer.registered.Store(true)
	} else {
		s.logger.Error(errors.New(st.GetError()), "Kubelet refused the registration", "driver", s.cfg.DriverName)
		if !s.offer.refused.Swap(true) {
			s.offer.refusedc <- struct{}{}
		}
	}
	if s.cfg.OnStatus != nil {
		s.mu.Lock()
		s.cfg.OnStatus(st.GetPluginRegistered(), st.GetError())
		s.mu.Unlock()
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}
