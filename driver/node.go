package driver

import (
	"context"
	"path/filepath"
	"regexp"
	"strconv"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// NodePublishVolume mounts an inline ephemeral volume, or one CreateVolume
// made, on the target path.
func (d *Driver) NodePublishVolume(ctx context.Context, req *csi.NodePublishVolumeRequest) (*csi.NodePublishVolumeResponse, error) {
	start := time.Now()
	id, spec, pod, err := d.publishRequest(req)
	if err != nil {
		// Refused before its attributes were parsed: still say whose.
		pod = podOf(req.GetVolumeContext())
	}
	logger := klog.FromContext(ctx).WithValues("volumeID", req.GetVolumeId())
	ctx = klog.NewContext(ctx, logger)
	if err == nil {
		err = d.publish(ctx, id, spec, pod, req.GetSecrets())
	}
	err = toStatus(err)
	kv := []any{"podNamespace", pod.Namespace, "podName", pod.Name, "targetPath", req.GetTargetPath(),
		"size", spec.Params.Size, "duration", time.Since(start)}
	switch status.Code(err) {
	case codes.OK:
		logger.V(2).Info("Published volume", kv...)
		return &csi.NodePublishVolumeResponse{}, nil
	case codes.Internal, codes.Unknown:
		logger.Error(err, "Publish failed", kv...)
	default:
		logger.V(2).Info("Publish refused", append(kv, "err", err)...)
	}
	return nil, err
}

// publishRequest validates a NodePublishVolume request into a spec. Every
// error is InvalidArgument, checked in the order csi-sanity expects: volume
// id, target path, capability, then attributes.
func (d *Driver) publishRequest(req *csi.NodePublishVolumeRequest) (string, publishSpec, podInfo, error) {
	var spec publishSpec
	id := req.GetVolumeId()
	if err := validVolumeID(id); err != nil {
		return "", spec, podInfo{}, err
	}
	target, err := d.cleanTarget(req.GetTargetPath())
	if err != nil {
		return "", spec, podInfo{}, err
	}
	spec.TargetPath = target
	capability := req.GetVolumeCapability()
	if capability == nil {
		return "", spec, podInfo{}, errorf(codes.InvalidArgument, "volume_capability is required")
	}
	mnt := capability.GetMount()
	if mnt == nil {
		return "", spec, podInfo{}, errorf(codes.InvalidArgument,
			"volume_capability: block access is not supported; want mount access")
	}
	if fs := mnt.GetFsType(); fs != "" {
		return "", spec, podInfo{}, errorf(codes.InvalidArgument,
			"volume_capability.mount.fs_type %q is not supported; leave fsType empty (csi-memfs volumes are always memfs)", fs)
	}
	if flags := mnt.GetMountFlags(); len(flags) > 0 {
		return "", spec, podInfo{}, errorf(codes.InvalidArgument,
			"volume_capability.mount.mount_flags %q are not supported; csi-memfs mounts are nosuid,nodev and "+
				"read-write unless the volume is readOnly", flags)
	}
	if g := mnt.GetVolumeMountGroup(); g != "" {
		gid, err := strconv.ParseUint(g, 10, 32)
		if err != nil {
			return "", spec, podInfo{}, errorf(codes.InvalidArgument,
				"volume_capability.mount.volume_mount_group %q: want a numeric gid (the pod's fsGroup)", g)
		}
		spec.MountGroup = new(uint32(gid))
	}
	spec.AccessMode = capability.GetAccessMode().GetMode()
	spec.ReadOnly = req.GetReadonly()
	switch spec.AccessMode {
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
		csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER:
	case csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
		spec.ReadOnly = true
	default:
		return "", spec, podInfo{}, errorf(codes.InvalidArgument,
			"volume_capability.access_mode %v is not supported; want SINGLE_NODE_WRITER, SINGLE_NODE_SINGLE_WRITER, "+
				"SINGLE_NODE_MULTI_WRITER or SINGLE_NODE_READER_ONLY", spec.AccessMode)
	}
	params, pod, err := parseVolumeParams(req.GetVolumeContext(), d.cfg.limits())
	if err != nil {
		return "", spec, podInfo{}, err
	}
	spec.Params = params
	if params.KernelCache && !spec.ReadOnly {
		return "", spec, podInfo{}, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: \"true\" needs a read-only volume (readOnly: true in the pod's csi volume, "+
				"or a SINGLE_NODE_READER_ONLY access mode): the kernel caches what it reads and would not see changes", attrKernelCache)
	}
	return id, spec, pod, nil
}

// volumeIDRE is what a volume id may look like: it names a directory.
// kubelet's inline volume ids ("csi-<sha256 hex>") fit.
var volumeIDRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$`)

// validVolumeID checks a volume id.
func validVolumeID(id string) error {
	if id == "" {
		return errorf(codes.InvalidArgument, "volume_id is required")
	}
	if !volumeIDRE.MatchString(id) {
		return errorf(codes.InvalidArgument,
			"volume_id %q: want 1 to 128 letters, digits, '.', '_' or '-', starting with a letter or digit", id)
	}
	return nil
}

// cleanTarget checks a target path: absolute, under kubelet's pods
// directory once cleaned; returned cleaned.
func (d *Driver) cleanTarget(p string) (string, error) {
	if p == "" {
		return "", errorf(codes.InvalidArgument, "target_path is required")
	}
	if !filepath.IsAbs(p) {
		return "", errorf(codes.InvalidArgument, "target_path %q: want an absolute path", p)
	}
	p = filepath.Clean(p)
	return p, checkTargetPath(d.cfg.KubeletDir, p)
}

// NodeUnpublishVolume unmounts a volume and frees its memory. Unpublishing
// an unknown or already unpublished volume succeeds.
func (d *Driver) NodeUnpublishVolume(ctx context.Context, req *csi.NodeUnpublishVolumeRequest) (*csi.NodeUnpublishVolumeResponse, error) {
	start := time.Now()
	id := req.GetVolumeId()
	logger := klog.FromContext(ctx).WithValues("volumeID", id)
	ctx = klog.NewContext(ctx, logger)
	err := validVolumeID(id)
	var target string
	if err == nil {
		target, err = d.cleanTarget(req.GetTargetPath())
	}
	var pod podInfo
	if err == nil {
		pod, err = d.unpublish(ctx, id, target)
	}
	err = toStatus(err)
	kv := []any{"podNamespace", pod.Namespace, "podName", pod.Name, "targetPath", req.GetTargetPath(), "duration", time.Since(start)}
	switch status.Code(err) {
	case codes.OK:
		logger.V(2).Info("Unpublished volume", kv...)
		return &csi.NodeUnpublishVolumeResponse{}, nil
	case codes.Internal, codes.Unknown:
		logger.Error(err, "Unpublish failed", kv...)
	default:
		logger.V(2).Info("Unpublish refused", append(kv, "err", err)...)
	}
	return nil, err
}

// NodeGetInfo reports the node id, how many volumes it takes, and its
// topology segment (TopologyKey): kubelet labels the node with it, and the
// volumes CreateVolume makes are reachable from it alone.
func (d *Driver) NodeGetInfo(context.Context, *csi.NodeGetInfoRequest) (*csi.NodeGetInfoResponse, error) {
	return &csi.NodeGetInfoResponse{NodeId: d.cfg.NodeID, MaxVolumesPerNode: d.cfg.MaxVolumes,
		AccessibleTopology: d.topology()}, nil
}

// NodeGetCapabilities: volume stats, and the volume_mount_group (fsGroup)
// delegation.
func (d *Driver) NodeGetCapabilities(context.Context, *csi.NodeGetCapabilitiesRequest) (*csi.NodeGetCapabilitiesResponse, error) {
	rpc := func(t csi.NodeServiceCapability_RPC_Type) *csi.NodeServiceCapability {
		return &csi.NodeServiceCapability{Type: &csi.NodeServiceCapability_Rpc{Rpc: &csi.NodeServiceCapability_RPC{Type: t}}}
	}
	return &csi.NodeGetCapabilitiesResponse{Capabilities: []*csi.NodeServiceCapability{
		rpc(csi.NodeServiceCapability_RPC_GET_VOLUME_STATS),
		rpc(csi.NodeServiceCapability_RPC_VOLUME_MOUNT_GROUP),
	}}, nil
}
