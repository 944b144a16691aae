package driver

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"net"
	"os"
	"path/filepath"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
	"google.golang.org/grpc"
)

// sanitySkips are the csi-sanity specs a node-only plugin of inline
// ephemeral volumes does not answer, with the reason:
//
//   - "[Controller Server]": csi-memfs has no controller service (it
//     advertises no CONTROLLER_SERVICE capability); kubelet makes up inline
//     volumes itself. These specs test CreateVolume, ListVolumes,
//     snapshots, expansion and modification, all controller calls.
//   - "[GroupController": no group controller service either (group
//     snapshots).
//
// The Node Service specs that need a volume get one from fakeController
// (below), which stands in for kubelet: it hands out a volume id and the
// volume_context kubelet would send for an inline volume, so those specs
// publish, check and unpublish real volumes on the real binary. The specs
// that skip themselves do so because the plugin does not advertise the
// capability they test: NodeStageVolume/NodeUnstageVolume (no
// STAGE_UNSTAGE_VOLUME: nothing to stage in memory), NodeExpandVolume (no
// EXPAND_VOLUME), NodeGetVolumeHealth and NodeGetStorageHealth (alpha,
// not advertised), SINGLE_NODE_MULTI_WRITER, and "should work"/"should be
// idempotent" (they drive the controller's CreateVolume/ControllerPublish
// flow and skip without a controller service).
var sanitySkips = []string{`\[Controller Server\]`, `\[GroupController`}

// TestSanity runs csi-sanity (csi-test v5) against the real csi-memfs
// binary over its unix socket.
func TestSanity(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	p := startServe(t, root)

	ctrlSock := filepath.Join(root, "controller.sock")
	lis, err := net.Listen("unix", ctrlSock)
	if err != nil {
		t.Fatal(err)
	}
	srv := grpc.NewServer()
	csi.RegisterControllerServer(srv, fakeController{})
	pluginConn := dial(t, p.endpoint)
	defer pluginConn.Close()
	csi.RegisterIdentityServer(srv, identityProxy{c: csi.NewIdentityClient(pluginConn)})
	go srv.Serve(lis)
	defer srv.Stop()

	cfg := sanity.NewTestConfig()
	cfg.Address = p.endpoint
	cfg.ControllerAddress = "unix://" + ctrlSock
	os.Mkdir(filepath.Join(root, "pods"), 0o755)
	cfg.TargetPath = filepath.Join(root, "pods", "csi-target")
	cfg.StagingPath = filepath.Join(root, "csi-staging")
	cfg.TestVolumeSize = 16 << 20

	sc := sanity.GinkgoTest(&cfg)
	RegisterFailHandler(Fail)
	suite, reporter := GinkgoConfiguration()
	suite.SkipStrings = append(suite.SkipStrings, sanitySkips...)
	if !reporter.Verbose && !reporter.VeryVerbose {
		reporter.Succinct = true
	}
	RunSpecs(t, "csi-memfs sanity", suite, reporter)
	sc.Finalize()

	if m := mountsUnder(t, root); len(m) > 0 {
		t.Errorf("mounts left after sanity: %v", m)
	}
	if entries, _ := os.ReadDir(filepath.Join(root, "state", "volumes")); len(entries) > 0 {
		t.Errorf("journal entries left after sanity: %d", len(entries))
	}
}

// identityProxy answers Identity calls on the fake controller's socket
// with the plugin's own answers (csi-sanity asks both sockets).
type identityProxy struct {
	csi.UnimplementedIdentityServer
	c csi.IdentityClient
}

func (p identityProxy) GetPluginInfo(ctx context.Context, r *csi.GetPluginInfoRequest) (*csi.GetPluginInfoResponse, error) {
	return p.c.GetPluginInfo(ctx, r)
}

func (p identityProxy) GetPluginCapabilities(ctx context.Context, r *csi.GetPluginCapabilitiesRequest) (*csi.GetPluginCapabilitiesResponse, error) {
	return p.c.GetPluginCapabilities(ctx, r)
}

func (p identityProxy) Probe(ctx context.Context, r *csi.ProbeRequest) (*csi.ProbeResponse, error) {
	return p.c.Probe(ctx, r)
}

// fakeController stands in for kubelet in csi-sanity: "creating" a volume
// returns the id and volume_context kubelet would give an inline volume.
type fakeController struct {
	csi.UnimplementedControllerServer
}

func (fakeController) ControllerGetCapabilities(context.Context, *csi.ControllerGetCapabilitiesRequest) (*csi.ControllerGetCapabilitiesResponse, error) {
	return &csi.ControllerGetCapabilitiesResponse{Capabilities: []*csi.ControllerServiceCapability{{
		Type: &csi.ControllerServiceCapability_Rpc{Rpc: &csi.ControllerServiceCapability_RPC{
			Type: csi.ControllerServiceCapability_RPC_CREATE_DELETE_VOLUME}},
	}}}, nil
}

func (fakeController) CreateVolume(_ context.Context, req *csi.CreateVolumeRequest) (*csi.CreateVolumeResponse, error) {
	sum := sha256.Sum256([]byte(req.GetName()))
	return &csi.CreateVolumeResponse{Volume: &csi.Volume{
		VolumeId:      "csi-" + hex.EncodeToString(sum[:]),
		CapacityBytes: req.GetCapacityRange().GetRequiredBytes(),
		VolumeContext: attrs("size", "16Mi"),
	}}, nil
}

func (fakeController) DeleteVolume(context.Context, *csi.DeleteVolumeRequest) (*csi.DeleteVolumeResponse, error) {
	return &csi.DeleteVolumeResponse{}, nil
}
