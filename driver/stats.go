package driver

import (
	"context"
	"fmt"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"

	"github.com/csi-memfs/csi-memfs/volume"
)

// NodeGetVolumeStats reports a volume's bytes and inodes: total is the
// limit, used and available are what df shows inside the pod (both come
// from the memory layer's tmpfs statfs, which the FUSE mount passes on).
func (d *Driver) NodeGetVolumeStats(ctx context.Context, req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	resp, err := d.volumeStats(req)
	return resp, toStatus(err)
}

func (d *Driver) volumeStats(req *csi.NodeGetVolumeStatsRequest) (*csi.NodeGetVolumeStatsResponse, error) {
	id := req.GetVolumeId()
	if err := validVolumeID(id); err != nil {
		return nil, err
	}
	if req.GetVolumePath() == "" {
		return nil, errorf(codes.InvalidArgument, "volume_path is required")
	}
	e := d.vols.get(id)
	if e == nil {
		return nil, errorf(codes.NotFound, "volume %s is not published on this node", id)
	}
	if p, err := d.cleanTarget(req.GetVolumePath()); err != nil || p != e.rec.Spec.TargetPath {
		return nil, errorf(codes.NotFound, "volume %s is not published at %s (it is at %s)", id, req.GetVolumePath(), e.rec.Spec.TargetPath)
	}
	u, err := e.usage()
	if err != nil {
		return nil, err
	}
	return &csi.NodeGetVolumeStatsResponse{Usage: []*csi.VolumeUsage{
		{Unit: csi.VolumeUsage_BYTES, Total: int64(u.BytesLimit), Used: int64(u.BytesUsed), Available: int64(u.BytesLimit - u.BytesUsed)},
		{Unit: csi.VolumeUsage_INODES, Total: int64(u.InodesLimit), Used: int64(u.InodesUsed), Available: int64(u.InodesLimit - u.InodesUsed)},
	}}, nil
}

// usage returns the volume's usage. A lost volume has none to report: its
// pod sees a dead mount.
func (e *entry) usage() (volume.Usage, error) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	if e.lost {
		return volume.Usage{}, errorf(codes.FailedPrecondition,
			"volume %s was served by a previous plugin process and is lost: its pod sees "+
				"\"transport endpoint is not connected\"; unpublish it (delete the pod) to free its memory", e.id())
	}
	if e.vol == nil {
		return volume.Usage{}, errorf(codes.NotFound, "volume %s is being unpublished", e.id())
	}
	u, err := e.vol.Usage()
	if err != nil {
		return volume.Usage{}, fmt.Errorf("volume %s: usage: %w", e.id(), err)
	}
	return u, nil
}
