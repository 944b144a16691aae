package driver

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/kubernetes-csi/csi-test/v5/pkg/sanity"
	. "github.com/onsi/ginkgo/v2"
	. "github.com/onsi/gomega"
)

// sanitySkips are the csi-sanity specs csi-memfs does not answer, with the
// reason:
//
//   - "[GroupController": no group controller service (group snapshots).
//
// The Controller Server specs run against the plugin's own controller
// service (controller.go), which every node serves for itself; the Node
// Service specs publish, check and unpublish real volumes it created on
// the real binary. The specs that skip themselves do so because the plugin
// does not advertise the capability they test: ListVolumes, snapshots,
// expansion, modification, ControllerPublishVolume, NodeStageVolume (no
// STAGE_UNSTAGE_VOLUME: nothing to stage in memory), NodeExpandVolume,
// NodeGetVolumeHealth and NodeGetStorageHealth.
var sanitySkips = []string{`\[GroupController`}

// TestSanity runs csi-sanity (csi-test v5) against the real csi-memfs
// binary over its unix socket.
func TestSanity(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	p := startServe(t, root)

	cfg := sanity.NewTestConfig()
	cfg.Address = p.endpoint
	cfg.ControllerAddress = p.endpoint
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
