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

// GetPluginCapabilities reports none: csi-memfs is a node plugin with no
// controller service and no topology.
func (d *Driver) GetPluginCapabilities(context.Context, *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return &csi.GetPluginCapabilitiesResponse{}, nil
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
