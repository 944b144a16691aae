package driver

import (
	"context"
	"maps"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
)

// createReq is a CreateVolume request as the provisioner makes it for a
// claim of size bytes on the StorageClass parameters params.
func createReq(name string, size int64, params map[string]string) *csi.CreateVolumeRequest {
	return &csi.CreateVolumeRequest{
		Name:               name,
		CapacityRange:      &csi.CapacityRange{RequiredBytes: size},
		VolumeCapabilities: []*csi.VolumeCapability{mountCap(csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER)},
		Parameters:         params,
	}
}

// TestController checks CreateVolume, DeleteVolume and GetCapacity over
// the socket: the codes of refusals, idempotence, and that the volume
// context publishes the volume the parameters describe.
func TestController(t *testing.T) {
	env := startDriver(t, func(c *Config) {
		c.NodeBudget = 64 << 20
		c.MaxVolumeSize = 48 << 20
	})
	ctx := context.Background()
	ctrl := csi.NewControllerClient(env.conn)

	otherNode := &csi.TopologyRequirement{Requisite: []*csi.Topology{{Segments: map[string]string{TopologyKey: "other"}}}}
	for _, tt := range []struct {
		name string
		req  *csi.CreateVolumeRequest
		code codes.Code
		msg  string
	}{
		{"no name", createReq("", 16<<20, nil), codes.InvalidArgument, "name"},
		{"no capabilities", &csi.CreateVolumeRequest{Name: "v"}, codes.InvalidArgument, "volume_capabilities"},
		{"too big", createReq("v", 49<<20, nil), codes.OutOfRange, "--max-volume-size"},
		{"limit below minimum", &csi.CreateVolumeRequest{Name: "v", VolumeCapabilities: createReq("", 0, nil).VolumeCapabilities,
			CapacityRange: &csi.CapacityRange{LimitBytes: 4096}}, codes.OutOfRange, "limit_bytes"},
		{"size parameter", createReq("v", 16<<20, map[string]string{"size": "1Gi"}), codes.InvalidArgument, "parameters.size"},
		{"unknown parameter", createReq("v", 16<<20, map[string]string{"sise": "1"}), codes.InvalidArgument, `unknown key "sise"`},
		{"bad seal", createReq("v", 16<<20, map[string]string{"seal": "../x"}), codes.InvalidArgument, "volumeAttributes.seal"},
		{"policy without image", createReq("v", 16<<20, map[string]string{"imagePullPolicy": "Always"}), codes.InvalidArgument, "imagePullPolicy"},
		{"other node", func() *csi.CreateVolumeRequest {
			r := createReq("v", 16<<20, nil)
			r.AccessibilityRequirements = otherNode
			return r
		}(), codes.ResourceExhausted, TopologyKey},
	} {
		_, err := ctrl.CreateVolume(ctx, tt.req)
		if status.Code(err) != tt.code || !strings.Contains(err.Error(), tt.msg) {
			t.Errorf("%s: CreateVolume = %v, want %v naming %q", tt.name, err, tt.code, tt.msg)
		}
	}

	params := map[string]string{"seal": "/a/*.conf", "noswap": "false", "inodes": "5000",
		kubeletPrefix + "pvc/name": "claim"} // --extra-create-metadata
	resp, err := ctrl.CreateVolume(ctx, createReq("pvc-1", 16<<20, params))
	if err != nil {
		t.Fatalf("CreateVolume: %v", err)
	}
	v := resp.GetVolume()
	want := map[string]string{"size": "16777216", "inodes": "5000", "seal": "a/*.conf", attrProvisioned: "true"}
	if !maps.Equal(v.GetVolumeContext(), want) || v.GetCapacityBytes() != 16<<20 {
		t.Errorf("CreateVolume = %v, want capacity 16Mi and context %v", v, want)
	}
	if seg := v.GetAccessibleTopology(); len(seg) != 1 || seg[0].GetSegments()[TopologyKey] != "test-node" {
		t.Errorf("accessible_topology = %v, want %s=test-node", seg, TopologyKey)
	}
	again, err := ctrl.CreateVolume(ctx, createReq("pvc-1", 16<<20, params))
	if err != nil || again.GetVolume().GetVolumeId() != v.GetVolumeId() {
		t.Errorf("repeated CreateVolume = %v, %v; want the same volume %s", again, err, v.GetVolumeId())
	}
	if _, err := ctrl.CreateVolume(ctx, createReq("pvc-1", 32<<20, params)); status.Code(err) != codes.AlreadyExists {
		t.Errorf("CreateVolume of the name with another size = %v, want AlreadyExists", err)
	}
	if r, err := ctrl.CreateVolume(ctx, &csi.CreateVolumeRequest{Name: "pvc-small", CapacityRange: &csi.CapacityRange{RequiredBytes: 1},
		VolumeCapabilities: createReq("", 0, nil).VolumeCapabilities}); err != nil || r.GetVolume().GetCapacityBytes() != minVolumeSize {
		t.Errorf("CreateVolume of 1 byte = %v, %v; want the smallest volume", r, err)
	}

	// kubelet publishes it with the PV's volumeAttributes, plus its own.
	pa := maps.Clone(v.GetVolumeContext())
	pa[attrEphemeral] = "false"
	pa[attrPodName] = "pod-1"
	target := env.publish(t, v.GetVolumeId(), pa)
	rec := env.d.vols.get(v.GetVolumeId())
	if rec == nil || rec.rec.Spec.Params.Size != 16<<20 || rec.rec.Spec.Params.Inodes != 5000 {
		t.Fatalf("published volume = %+v, want size 16Mi, 5000 inodes", rec)
	}
	if err := os.WriteFile(filepath.Join(target, "f"), []byte("x"), 0o644); err != nil {
		t.Errorf("write to the published volume: %v", err)
	}

	capOf := func(top *csi.Topology) int64 {
		t.Helper()
		r, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{AccessibleTopology: top})
		if err != nil {
			t.Fatalf("GetCapacity: %v", err)
		}
		return r.GetAvailableCapacity()
	}
	if got := capOf(env.d.topology()); got != 48<<20 {
		t.Errorf("GetCapacity with 16Mi of 64Mi published = %d, want 48Mi", got)
	}
	if got := capOf(otherNode.Requisite[0]); got != 0 {
		t.Errorf("GetCapacity of another node = %d, want 0", got)
	}
	if _, err := ctrl.GetCapacity(ctx, &csi.GetCapacityRequest{Parameters: map[string]string{"noswap": "yes"}}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("GetCapacity with a bad parameter = %v, want InvalidArgument", err)
	}
	if _, err := ctrl.CreateVolume(ctx, createReq("pvc-2", 48<<20+1, nil)); status.Code(err) != codes.OutOfRange {
		t.Errorf("CreateVolume over the size limit = %v, want OutOfRange", err)
	}
	env.unpublish(t, v.GetVolumeId(), target)
	if got := capOf(nil); got != 64<<20 {
		t.Errorf("GetCapacity after unpublish = %d, want 64Mi", got)
	}
	for range 2 {
		if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{VolumeId: v.GetVolumeId()}); err != nil {
			t.Errorf("DeleteVolume: %v", err)
		}
	}
	if _, err := ctrl.DeleteVolume(ctx, &csi.DeleteVolumeRequest{}); status.Code(err) != codes.InvalidArgument {
		t.Errorf("DeleteVolume without an id = %v, want InvalidArgument", err)
	}
}

// TestProvisionedAttributesRoundTrip checks that parseParams reads back
// the volume_context CreateVolume renders.
func TestProvisionedAttributesRoundTrip(t *testing.T) {
	lim := limits{DefaultSize: 8 << 20, MaxSize: 1 << 30, MaxInodes: 1 << 20}
	for _, a := range []map[string]string{
		{},
		{"image": "registry.example/app:1", "imagePath": "/data/", "imagePullPolicy": "Never", "seal": "x,y/*", "noswap": "true"},
		{"kernelCache": "true"},
	} {
		p, err := parseParams(a, lim)
		if err != nil {
			t.Fatalf("parseParams(%v): %v", a, err)
		}
		vc := p.attributes()
		vc[attrProvisioned] = "true"
		q, _, err := parseVolumeParams(vc, lim)
		if err != nil || !q.equal(p) {
			t.Errorf("parseVolumeParams(%v) = %+v, %v; want %+v", vc, q, err, p)
		}
	}
}
