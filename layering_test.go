// Package layering_test states every import every package of the module
// may make, and fails on any other: the layers of docs/architecture.md,
// kept true. Imports point down; the standard library is always allowed.
package layering_test

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os/exec"
	"slices"
	"sort"
	"strings"
	"testing"
)

const mod = "github.com/csi-memfs/csi-memfs/"

// Third-party modules, by import-path prefix.
const (
	unix      = "golang.org/x/sys/"
	fuse      = "github.com/hanwen/go-fuse/v2/"
	klog      = "k8s.io/klog/v2"
	logr      = "github.com/go-logr/logr"
	ggcr      = "github.com/google/go-containerregistry/"
	compress  = "github.com/klauspost/compress/"
	sync      = "golang.org/x/sync/"
	yaml      = "sigs.k8s.io/yaml"
	roots     = "golang.org/x/crypto/x509roots/"
	quantity  = "k8s.io/apimachinery/pkg/api/resource"
	csi       = "github.com/container-storage-interface/spec/"
	grpc      = "google.golang.org/grpc"
	protobuf  = "google.golang.org/protobuf/"
	sanitizer = "github.com/kubernetes-csi/csi-lib-utils/"
	prom      = "github.com/prometheus/client_golang/"
	mountutil = "k8s.io/mount-utils"
	kubeletv1 = "k8s.io/kubelet/pkg/apis/pluginregistration/"
	csisanity = "github.com/kubernetes-csi/csi-test/"
	ginkgo    = "github.com/onsi/"
	// The provisioner's: the Kubernetes API and the external-provisioner
	// library (it brings client-go).
	kubeapi      = "k8s.io/api/"
	apimachine   = "k8s.io/apimachinery/"
	clientgo     = "k8s.io/client-go/"
	provisionlib = "sigs.k8s.io/sig-storage-lib-external-provisioner/"
)

// rule is what one package may import: the module's packages by name
// (relative to the module), and third-party ones by prefix. Tests may
// import, besides, what tests lists.
type rule struct {
	imports []string
	tests   []string
}

// layers is the whole table. A package missing from it fails the test,
// so a new package states its place when it is added.
var layers = map[string]rule{
	// The bottom: the contract a served tree satisfies.
	"vfs": {imports: []string{unix}},
	// The writable memory layer and the union over a lower tree: no
	// FUSE, gRPC, Kubernetes or logging.
	"memfs": {imports: []string{"vfs", unix},
		tests: []string{"internal/acltest"}},
	"overlay": {imports: []string{"vfs", "memfs", unix},
		tests: []string{"internal/treetest"}},
	// FUSE: the one package that imports go-fuse.
	"fusefs": {imports: []string{"vfs", "memfs", fuse, unix, klog},
		tests: []string{"overlay", "internal/acltest", "internal/treetest", logr}},
	// Descriptor bundles and the holder: no FUSE, no CSI.
	"handoff": {imports: []string{unix, klog}},
	// OCI images as lower directories.
	// sigs.k8s.io/yaml reads kubelet's credential provider config.
	"image": {imports: []string{ggcr, compress, sync, yaml, unix, klog, logr},
		tests: []string{"internal/imagetest"}},
	// The volume builder: the one place lower, memfs, overlay and fusefs
	// are put together.
	"volume": {imports: []string{"vfs", "memfs", "overlay", "fusefs", "handoff", unix, klog},
		tests: []string{"internal/imagetest", ggcr}},
	// kubelet plugin registration: knows nothing of volumes.
	"registrar": {imports: []string{"handoff", kubeletv1, grpc, klog},
		tests: []string{"internal/sockettest"}},
	// The CSI services.
	"driver": {imports: []string{"volume", "image", "handoff", "registrar",
		csi, grpc, protobuf, sanitizer, prom, mountutil, quantity, unix, klog, logr},
		tests: []string{"memfs", "internal/imagetest", "internal/sockettest", ggcr, csisanity, ginkgo, kubeletv1}},
	// The node's provisioner and capacity publisher: the one package that
	// talks to the Kubernetes API; it calls the driver's controller
	// service through its own small interface, so knows no driver.
	"provisioner": {imports: []string{csi, grpc, kubeapi, apimachine, clientgo, provisionlib, klog},
		tests: []string{protobuf}},
	// The command: flags and wiring; `hold` answers for a dead plugin
	// with fusefs.Refuse.
	// logr: --logging-format=json installs a logr.Logger over log/slog
	// as klog's logger (component-base's JSON format is far heavier).
	// provisioner, apimachine, clientgo: serve --provisioner builds the
	// in-cluster client and the owner of the capacity objects.
	"cmd/csi-memfs": {imports: []string{"driver", "volume", "handoff", "fusefs", "provisioner", roots, quantity,
		apimachine, clientgo, klog, logr},
		tests: []string{ggcr, unix}},
	// Test and build tools.
	"internal/imagetest":  {imports: []string{ggcr, compress}},
	"internal/sockettest": {imports: []string{"handoff"}},
	"internal/acltest":    {},
	"internal/treetest":   {},
	"bench/cmd/benchtool": {},
	"hack/ociimage":       {imports: []string{ggcr}},
	"hack/pause":          {},
	"hack/release":        {imports: []string{ggcr}},
	"test/e2e":            {tests: []string{ggcr, unix}},
	"test/e2e/sealtool":   {imports: []string{unix}},
	".":                   {},
}

// pkg is what `go list -json` says of one package.
type pkg struct {
	ImportPath   string
	Imports      []string
	TestImports  []string
	XTestImports []string
}

func TestLayering(t *testing.T) {
	pkgs := listPackages(t)
	seen := map[string]bool{}
	for _, p := range pkgs {
		name := strings.TrimPrefix(strings.TrimPrefix(p.ImportPath, mod), strings.TrimSuffix(mod, "/"))
		if name == "" {
			name = "."
		}
		seen[name] = true
		r, ok := layers[name]
		if !ok {
			t.Errorf("package %s is not in the layering table: state what it may import", name)
			continue
		}
		for _, msg := range check(name, r, p) {
			t.Error(msg)
		}
	}
	for name := range layers {
		if !seen[name] {
			t.Errorf("the layering table names %s, which does not exist", name)
		}
	}
}

// TestLayeringRefusesForbiddenImports plants forbidden imports and checks
// that the rules catch each one.
func TestLayeringRefusesForbiddenImports(t *testing.T) {
	for _, c := range []struct {
		name string
		p    pkg
	}{
		{"memfs", pkg{Imports: []string{"os", fuse + "fuse"}}},
		{"overlay", pkg{Imports: []string{mod + "fusefs"}}},
		{"vfs", pkg{Imports: []string{mod + "memfs"}}},
		{"fusefs", pkg{Imports: []string{mod + "driver"}}},
		{"image", pkg{Imports: []string{mod + "overlay"}}},
		{"cmd/csi-memfs", pkg{Imports: []string{mod + "memfs"}}},
		{"driver", pkg{Imports: []string{fuse + "fs"}}},
		{"driver", pkg{Imports: []string{clientgo + "kubernetes"}}},
		{"provisioner", pkg{Imports: []string{mod + "driver"}}},
		{"memfs", pkg{TestImports: []string{grpc}}},
	} {
		if len(check(c.name, layers[c.name], c.p)) == 0 {
			t.Errorf("%s importing %v passed the layering rules", c.name, slices.Concat(c.p.Imports, c.p.TestImports))
		}
	}
}

// check returns one message for each import of p that r does not allow.
func check(name string, r rule, p pkg) []string {
	var msgs []string
	allowed := func(imp string, list []string) bool {
		if !strings.Contains(strings.SplitN(imp, "/", 2)[0], ".") {
			return true // the standard library
		}
		for _, a := range list {
			if strings.HasPrefix(imp, mod) {
				if imp == mod+a {
					return true
				}
			} else if strings.HasPrefix(imp, a) {
				return true
			}
		}
		return false
	}
	for _, imp := range p.Imports {
		if !allowed(imp, r.imports) {
			msgs = append(msgs, fmt.Sprintf("%s imports %s, which the layering table does not allow", name, imp))
		}
	}
	testList := slices.Concat(r.imports, r.tests)
	for _, imp := range slices.Concat(p.TestImports, p.XTestImports) {
		if imp == mod+name {
			continue // an external test of the package itself
		}
		if !allowed(imp, testList) {
			msgs = append(msgs, fmt.Sprintf("%s's tests import %s, which the layering table does not allow", name, imp))
		}
	}
	return msgs
}

// listPackages lists the module's packages, e2e-tagged files included.
func listPackages(t *testing.T) []pkg {
	t.Helper()
	out, err := exec.Command("go", "list", "-tags", "e2e", "-json=ImportPath,Imports,TestImports,XTestImports", "./...").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	var pkgs []pkg
	dec := json.NewDecoder(bufio.NewReader(bytes.NewReader(out)))
	for dec.More() {
		var p pkg
		if err := dec.Decode(&p); err != nil {
			t.Fatalf("go list output: %v", err)
		}
		pkgs = append(pkgs, p)
	}
	sort.Slice(pkgs, func(i, j int) bool { return pkgs[i].ImportPath < pkgs[j].ImportPath })
	return pkgs
}
