package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"maps"
	"sync"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/protobuf/types/known/wrapperspb"
	"k8s.io/klog/v2"
)

// TopologyKey is the topology segment of a node: its value is the node id.
// NodeGetInfo reports it, CreateVolume answers with it, and GetCapacity
// answers for it. A volume made by CreateVolume is reachable from its node
// alone: its memory is there.
const TopologyKey = "topology.memfs.csi.dev/node"

// provisionedPrefix starts the id of a volume CreateVolume makes.
const provisionedPrefix = "memfs-"

// created remembers the volumes CreateVolume answered for, by request
// name, so that a repeated request is answered alike and one with other
// parameters is refused (AlreadyExists). It is memory only: the
// PersistentVolume is the record; after a restart a repeated request is
// answered anew, which is harmless since nothing is allocated until
// NodePublishVolume.
type created struct {
	// mu protects byName; a leaf.
	mu sync.Mutex
	// byName maps a request name to the volume answered.
	byName map[string]*csi.Volume
}

// ControllerGetCapabilities: create and delete volumes, and capacity.
func (d *Driver) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	rpc := func(t csi.ControllerServiceCapability_RPC_Type) *csi.ControllerServiceCapability {
		return &csi.ControllerServiceCapability{Type: &csi.ControllerServiceCapability_Rpc{
			Rpc: &csi.ControllerServiceCapability_RPC{Type: t}}}
	}
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{
		rpc(csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME),
		rpc(csi.ControllerServiceCapability_RPC_GET_CAPACITY),
	}}, nil
}

// CreateVolume answers for a volume of a StorageClass: its parameters are
// validated like an inline volume's attributes (parseParams), its size is
// the request's capacity_range, and its volume_context carries the parsed
// parameters to NodePublishVolume. Nothing is allocated: the memory is
// reserved when a pod's volume is published on the node, and released when
// it is unpublished. The id is a function of the request name.
func (d *Driver) CreateVolume(ctx context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	v, err := d.createVolume(req)
	logger := klog.FromContext(ctx).WithValues("name", req.GetName())
	if err != nil {
		logger.V(2).Info("CreateVolume refused", "err", err)
		return nil, toStatus(err)
	}
	logger.V(2).Info("Created volume", "volumeID", v.VolumeId, "size", v.CapacityBytes)
	return &csi.CreateVolumeResponse{Volume: v}, nil
}

// createVolume checks a CreateVolume request, in the order csi-sanity
// expects: name, capabilities, capacity, parameters, topology.
func (d *Driver) createVolume(req *csi.CreateVolumeRequest) (*csi.Volume, error) {
	name := req.GetName()
	if name == "" {
		return nil, errorf(codes.InvalidArgument, "name is required")
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return nil, err
	}
	if req.GetVolumeContentSource() != nil {
		return nil, errorf(codes.InvalidArgument,
			"volume_content_source: csi-memfs volumes cannot be cloned or restored from snapshots (use the image parameter)")
	}
	size, err := d.capacity(req.GetCapacityRange())
	if err != nil {
		return nil, err
	}
	params := req.GetParameters()
	if err := checkKeys(params); err != nil {
		return nil, err
	}
	if _, ok := params[attrSize]; ok {
		return nil, errorf(codes.InvalidArgument,
			"parameters.%s: a StorageClass sets no size; the size is the claim's resources.requests.storage", attrSize)
	}
	attrs := maps.Clone(params)
	if attrs == nil {
		attrs = map[string]string{}
	}
	attrs[attrSize] = quantityString(size)
	p, err := parseParams(attrs, d.cfg.limits())
	if err != nil {
		return nil, err
	}
	if !d.reachable(req.GetAccessibilityRequirements()) {
		return nil, errorf(codes.ResourceExhausted,
			"accessibility_requirements: no requisite topology has %s=%s, the node this plugin serves; "+
				"csi-memfs provisions on the selected node only (volumeBindingMode: WaitForFirstConsumer)",
			TopologyKey, d.cfg.NodeID)
	}
	if free := d.budget.free(); free >= 0 && p.Size > free {
		return nil, errorf(codes.ResourceExhausted,
			"capacity_range: %s requested, this node's memory budget has %s left (flag --node-memory-budget)",
			quantityString(p.Size), quantityString(free))
	}

	vc := p.attributes()
	vc[attrProvisioned] = "true"
	sum := sha256.Sum256([]byte(name))
	v := &csi.Volume{
		VolumeId:           provisionedPrefix + hex.EncodeToString(sum[:]),
		CapacityBytes:      p.Size,
		VolumeContext:      vc,
		AccessibleTopology: []*csi.Topology{d.topology()},
	}
	d.created.mu.Lock()
	defer d.created.mu.Unlock()
	if old, ok := d.created.byName[name]; ok {
		if old.CapacityBytes != v.CapacityBytes || !maps.Equal(old.VolumeContext, v.VolumeContext) {
			return nil, errorf(codes.AlreadyExists,
				"name %q: a volume of that name exists with another size or parameters", name)
		}
		return old, nil
	}
	if d.created.byName == nil {
		d.created.byName = map[string]*csi.Volume{}
	}
	d.created.byName[name] = v
	return v, nil
}

// capacity returns the size of a volume for a capacity_range: the
// required bytes (the default size without), raised to the smallest volume
// if the limit allows. OutOfRange when no size fits.
func (d *Driver) capacity(r *csi.CapacityRange) (int64, error) {
	req, lim := r.GetRequiredBytes(), r.GetLimitBytes()
	if req < 0 || lim < 0 || (lim > 0 && req > lim) {
		return 0, errorf(codes.InvalidArgument,
			"capacity_range: required_bytes %d and limit_bytes %d: want 0 <= required <= limit", req, lim)
	}
	size := req
	if size == 0 {
		size = d.cfg.DefaultVolumeSize
		if lim > 0 && size > lim {
			size = lim
		}
	}
	size = max(size, minVolumeSize)
	switch {
	case lim > 0 && size > lim:
		return 0, errorf(codes.OutOfRange,
			"capacity_range.limit_bytes: %s is less than the smallest volume, %s", quantityString(lim), quantityString(minVolumeSize))
	case size > d.cfg.MaxVolumeSize:
		return 0, errorf(codes.OutOfRange,
			"capacity_range.required_bytes: %s is more than this node allows per volume (%s, flag --max-volume-size)",
			quantityString(size), quantityString(d.cfg.MaxVolumeSize))
	}
	return size, nil
}

// checkCapabilities checks the capabilities of a volume: at least one, all
// mount access without fs_type, single-node modes.
func checkCapabilities(caps []*csi.VolumeCapability) error {
	if len(caps) == 0 {
		return errorf(codes.InvalidArgument, "volume_capabilities: at least one is required")
	}
	for _, c := range caps {
		if c.GetMount() == nil {
			return errorf(codes.InvalidArgument, "volume_capabilities: block access is not supported; want mount access")
		}
		if fs := c.GetMount().GetFsType(); fs != "" {
			return errorf(codes.InvalidArgument,
				"volume_capabilities.mount.fs_type %q is not supported; leave fsType empty", fs)
		}
		switch m := c.GetAccessMode().GetMode(); m {
		case csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_SINGLE_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_MULTI_WRITER,
			csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY:
		default:
			return errorf(codes.InvalidArgument,
				"volume_capabilities.access_mode %v is not supported; want a single-node mode (ReadWriteOnce, ReadWriteOncePod)", m)
		}
	}
	return nil
}

// topology is this node's segment.
func (d *Driver) topology() *csi.Topology {
	return &csi.Topology{Segments: map[string]string{TopologyKey: d.cfg.NodeID}}
}

// reachable says whether this node satisfies requirements: no requisite
// topology, or one naming this node (or without our key).
func (d *Driver) reachable(r *csi.TopologyRequirement) bool {
	if len(r.GetRequisite()) == 0 {
		return true
	}
	for _, t := range r.GetRequisite() {
		if n, ok := t.GetSegments()[TopologyKey]; !ok || n == d.cfg.NodeID {
			return true
		}
	}
	return false
}

// DeleteVolume succeeds: a volume's memory is released when it is
// unpublished (the volume is ephemeral by contract).
func (d *Driver) DeleteVolume(ctx context.Context, req *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, toStatus(errorf(codes.InvalidArgument, "volume_id is required"))
	}
	d.created.mu.Lock()
	for name, v := range d.created.byName {
		if v.VolumeId == id {
			delete(d.created.byName, name)
		}
	}
	d.created.mu.Unlock()
	klog.FromContext(ctx).V(2).Info("Deleted volume", "volumeID", id)
	return &csi.DeleteVolumeResponse{}, nil
}

// ValidateVolumeCapabilities confirms the capabilities a volume this
// process created supports; NotFound for any other.
func (d *Driver) ValidateVolumeCapabilities(_ context.Context, req *csi.ValidateVolumeCapabilitiesRequest) (*csi.ValidateVolumeCapabilitiesResponse, error) {
	id := req.GetVolumeId()
	if id == "" {
		return nil, toStatus(errorf(codes.InvalidArgument, "volume_id is required"))
	}
	if len(req.GetVolumeCapabilities()) == 0 {
		return nil, toStatus(errorf(codes.InvalidArgument, "volume_capabilities: at least one is required"))
	}
	d.created.mu.Lock()
	found := false
	for _, v := range d.created.byName {
		found = found || v.VolumeId == id
	}
	d.created.mu.Unlock()
	if !found {
		return nil, toStatus(errorf(codes.NotFound, "volume_id %q: no such volume", id))
	}
	if err := checkCapabilities(req.GetVolumeCapabilities()); err != nil {
		return &csi.ValidateVolumeCapabilitiesResponse{Message: err.Error()}, nil
	}
	return &csi.ValidateVolumeCapabilitiesResponse{Confirmed: &csi.ValidateVolumeCapabilitiesResponse_Confirmed{
		VolumeContext:      req.GetVolumeContext(),
		VolumeCapabilities: req.GetVolumeCapabilities(),
		Parameters:         req.GetParameters(),
	}}, nil
}

// GetCapacity answers the memory left in this node's budget for its
// topology segment (0 for any other segment), and the largest volume that
// fits. Without a budget it answers the largest volume size.
func (d *Driver) GetCapacity(_ context.Context, req *csi.GetCapacityRequest) (*csi.GetCapacityResponse, error) {
	if len(req.GetParameters()) > 0 {
		if err := checkKeys(req.GetParameters()); err != nil {
			return nil, toStatus(err)
		}
		if _, err := parseParams(req.GetParameters(), d.cfg.limits()); err != nil {
			return nil, toStatus(err)
		}
	}
	if t := req.GetAccessibleTopology(); t != nil {
		if n, ok := t.GetSegments()[TopologyKey]; ok && n != d.cfg.NodeID {
			return &csi.GetCapacityResponse{}, nil
		}
	}
	avail := d.budget.free()
	if avail < 0 {
		avail = d.cfg.MaxVolumeSize
	}
	maxSize := min(avail, d.cfg.MaxVolumeSize)
	if d.budget.full() {
		avail, maxSize = 0, 0
	}
	return &csi.GetCapacityResponse{
		AvailableCapacity: avail,
		MaximumVolumeSize: wrapperspb.Int64(maxSize),
		MinimumVolumeSize: wrapperspb.Int64(minVolumeSize),
	}, nil
}
