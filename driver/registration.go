package driver

import (
	"context"
	"errors"
	"fmt"
	"golang.org/x/sys/unix"
	"net"
	"os"
	"path/filepath"
	"sync"

	"google.golang.org/grpc"
	"k8s.io/klog/v2"
	registerapi "k8s.io/kubelet/pkg/apis/pluginregistration/v1"
)

// Kubelet plugin registration
//
// kubelet discovers node plugins by watching its plugins_registry directory
// (<kubelet-dir>/plugins_registry) for unix sockets. For each new socket it
// calls Registration.GetInfo, checks the answer, dials the CSI endpoint the
// answer names, and reports the outcome with NotifyRegistrationStatus. When
// the socket goes away, kubelet unregisters the plugin.
//
// Most CSI drivers run kubernetes-csi's node-driver-registrar sidecar for
// this. csi-memfs serves the same small API itself (ServeRegistration), so
// its pod needs one container; the chart keeps the sidecar as an option.

// supportedCSIVersions are the CSI spec versions kubelet may speak to the
// plugin.
var supportedCSIVersions = []string{"1.0.0"}

// RegistrationConfig configures ServeRegistration.
type RegistrationConfig struct {
	// DriverName is the CSI driver name kubelet registers. Required.
	DriverName string
	// KubeletEndpoint is the CSI socket's path as kubelet sees it on the
	// host, e.g. /var/lib/kubelet/plugins/memfs.csi.dev/csi.sock, which
	// differs from the path inside the plugin's container. Required,
	// absolute.
	KubeletEndpoint string
	// SocketPath is where the registration socket is created: the
	// plugins_registry directory as this process sees it, joined with
	// RegistrationSocketName(DriverName). Required, absolute.
	SocketPath string
	// OnStatus, if set, is called with every status kubelet reports:
	// registered or not, and kubelet's error message when not.
	OnStatus func(registered bool, message string)
}

// RegistrationSocketName is the name of the registration socket in kubelet's
// plugins_registry directory: <driver>-reg.sock, as node-driver-registrar
// names it.
func RegistrationSocketName(driverName string) string {
	return driverName + "-reg.sock"
}

func (c RegistrationConfig) validate() error {
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

// ServeRegistration serves kubelet's plugin-registration API on
// cfg.SocketPath until ctx is done, then removes the socket (kubelet then
// unregisters the plugin) and returns nil. A stale socket left by a
// previous process is replaced. It returns an error when cfg is invalid or
// the socket cannot be created or served.
func ServeRegistration(ctx context.Context, cfg RegistrationConfig) error {
	if err := cfg.validate(); err != nil {
		return err
	}
	lis, err := listenUnix(cfg.SocketPath)
	if err != nil {
		return fmt.Errorf("registration socket: %w", err)
	}
	ours := socketID(cfg.SocketPath)
	logger := klog.FromContext(ctx).WithValues("socket", cfg.SocketPath)
	srv := grpc.NewServer()
	registerapi.RegisterRegistrationServer(srv, &registrationServer{cfg: cfg, logger: logger})

	done := make(chan error, 1)
	go func() { done <- srv.Serve(lis) }()
	logger.Info("Serving kubelet plugin registration", "driver", cfg.DriverName, "endpoint", cfg.KubeletEndpoint)

	select {
	case <-ctx.Done():
		// Remove the socket first: kubelet unregisters as soon as it
		// disappears, before this process stops answering CSI calls. A
		// successor's socket there (a handover) stays.
		removeSocket(cfg.SocketPath, ours)
		srv.Stop()
		<-done
		return nil
	case err := <-done:
		removeSocket(cfg.SocketPath, ours)
		return fmt.Errorf("registration server: %w", err)
	}
}

// listenUnix listens on a unix socket at path, replacing a stale socket
// there; anything else at path is an error.
func listenUnix(path string) (net.Listener, error) {
	if fi, err := os.Lstat(path); err == nil {
		if fi.Mode().Type() != os.ModeSocket {
			return nil, fmt.Errorf("%s exists and is not a socket", path)
		}
		if err := os.Remove(path); err != nil {
			return nil, err
		}
	}
	if err := os.MkdirAll(filepath.Dir(path), 0o750); err != nil {
		return nil, err
	}
	return net.Listen("unix", path)
}

// registrationServer answers kubelet's registration calls.
type registrationServer struct {
	registerapi.UnimplementedRegistrationServer

	// cfg is the validated configuration. Immutable.
	cfg RegistrationConfig
	// logger carries the socket path. Immutable.
	logger klog.Logger
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
	} else {
		s.logger.Error(errors.New(st.GetError()), "Kubelet refused the registration", "driver", s.cfg.DriverName)
	}
	if s.cfg.OnStatus != nil {
		s.mu.Lock()
		s.cfg.OnStatus(st.GetPluginRegistered(), st.GetError())
		s.mu.Unlock()
	}
	return &registerapi.RegistrationStatusResponse{}, nil
}

// socketID identifies the socket file at path, or is zero.
func socketID(path string) fileStamp {
	var st unix.Stat_t
	if unix.Lstat(path, &st) != nil {
		return fileStamp{}
	}
	return fileStamp{st.Ino, st.Ctim}
}

// fileStamp tells one file from another at the same path: a successor's
// socket may get the inode number of one just removed, never its change
// time as well.
type fileStamp struct {
	ino   uint64
	ctime unix.Timespec
}

// removeSocket removes the socket at path if it is still the one bound as
// id: a successor process may have replaced it.
func removeSocket(path string, id fileStamp) {
	if id != (fileStamp{}) && socketID(path) == id {
		os.Remove(path)
	}
}
