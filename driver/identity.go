package driver

import (
	"context"
	"errors"
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/wrapperspb"
)

// GetPluginInfo reports the driver name and version.
func (d *Driver) GetPluginInfo(context.Context, *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	v := d.cfg.Version
	if v == "" {
		v = "unknown"
	}
	return &csi.GetPluginInfoResponse{Name: d.cfg.DriverName, VendorVersion: v}, nil
}

// GetPluginCapabilities reports the controller service (controller.go),
// which every node's plugin serves for its own node, and topology: a
// volume is reachable from the node whose memory holds it.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	svc := func(t csi.PluginCapability_Service_Type) *csi.PluginCapability {
		return &csi.PluginCapability{Type: &csi.PluginCapability_Service_{Service: &csi.PluginCapability_Service{Type: t}}}
	}
	return &csi.GetPluginCapabilitiesResponse{Capabilities: []*csi.PluginCapability{
		svc(csi.PluginCapability_Service_CONTROLLER_SERVICE),
		svc(csi.PluginCapability_Service_VOLUME_ACCESSIBILITY_CONSTRAINTS),
	}}, nil
}

// Probe says whether the plugin can serve volumes: it is ready once the
// journal is recovered, and healthy while /dev/fuse can be opened
// (FailedPrecondition, with the reason, when it cannot).
func (d *Driver) Probe(context.Context, *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	if err := d.probe(); err != nil {
		return nil, toStatus(err)
	}
	return &csi.ProbeResponse{Ready: wrapperspb.Bool(d.ready.Load())}, nil
}

// healthy returns why the plugin cannot serve volumes now, or nil:
// /healthz answers with it.
func (d *Driver) healthy() error {
	if err := d.probe(); err != nil {
		return err
	}
	if !d.ready.Load() {
		return errors.New("recovering the volume journal")
	}
	return nil
}

// probe returns why the plugin is unhealthy, or nil.
func (d *Driver) probe() error {
	if err := fuseUsable(); err != nil {
		return errorf(codes.FailedPrecondition, "%v", err)
	}
	return nil
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
