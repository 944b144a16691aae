//go:build e2e

package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strings"
	"testing"
	"time"
)

// The External Storage specs of Kubernetes' e2e.test
// (k8s.io/kubernetes/test/e2e/storage/external) for the driver that
// test/e2e/storage-suite/memfs.yaml declares. build-e2e-test.sh builds
// e2e.test at the cluster's version; run.sh passes its path as E2E_TEST_BIN.
const (
	storageSuiteDir = "test/e2e/storage-suite"
	// The CSI inline, generic ephemeral and dynamic PV specs (the volume
	// types memfs.yaml serves: the provisioner makes the PVs). Their pods
	// run e2e-test-images, which the e2e cluster cannot pull: testImages.
	storageSuiteFocus = `External.Storage.*memfs\.csi\.dev.*\[Testpattern: (CSI Ephemeral-volume|Generic Ephemeral-volume|Dynamic PV)`
	// agnhostImage is Kubernetes' agnhost test program (build-agnhost.sh)
	// on the workload image's busybox, which run.sh builds and imports.
	agnhostImage = "docker.io/csi-memfs/e2e-agnhost:e2e"
)

// storageSuiteSkip are the matching specs the suite does not run, and why:
//   - [Disruptive]: they restart kubelet or stop the node's services (the
//     cluster is the rest of the e2e suite's too);
//   - [Serial]: volume limits (filling the node up to MaxVolumesPerNode),
//     stress and performance at scale, and data-source populators;
//   - [Slow]: the same at a smaller scale, and the multi-volume and
//     subPath variants: with the provisioner, tens of minutes CI has no
//     budget for;
//   - [Feature:...]: optional cluster features the e2e cluster does not
//     have (snapshots, SELinux, VolumeAttributesClass, Windows nodes);
//   - [Flaky]: as Kubernetes' own CI.
//
// None of them is a CSI inline-volume spec. Immediate binding needs no
// pattern here: memfs.yaml's TopologyKeys make the suite skip those specs
// itself (a volume is one node's memory, made for a claim only once the
// scheduler picked the node), but for the topology one, which
// storageSuiteSkipSpecs names.
var storageSuiteSkip = []string{`\[Disruptive\]`, `\[Serial\]`, `\[Slow\]`, `\[Feature:`, `\[Flaky\]`}

// persistenceSpec is why storageSuiteSkipSpecs skips the specs that read,
// in a second pod, what a first pod wrote on the same claim: memfs.yaml's
// persistence: false does not skip them.
const persistenceSpec = "a second pod reads a first pod's files on the same claim; a volume's data is freed with its pod (persistence: false)"

// storageSuiteSkipSpecs are specs of the focus that do not apply to
// csi-memfs, skipped by name (the spec's text after the driver's name),
// and why.
var storageSuiteSkipSpecs = []struct{ spec, why string }{
	{"[Testpattern: Dynamic PV (default fs)] fsgroupchangepolicy (Always)[LinuxOnly], pod created with an initial fsgroup, new pod fsgroup applied to volume contents", persistenceSpec},
	{"[Testpattern: Dynamic PV (default fs)] fsgroupchangepolicy (OnRootMismatch)[LinuxOnly], pod created with an initial fsgroup, new pod fsgroup applied to volume contents", persistenceSpec},
	{"[Testpattern: Dynamic PV (default fs)] fsgroupchangepolicy (Always)[LinuxOnly], rwop pod created with an initial fsgroup, new pod fsgroup applied to volume contents", persistenceSpec},
	{"[Testpattern: Dynamic PV (default fs)] subPath should support existing directories when readOnly specified in the volumeSource", persistenceSpec},
	{"[Testpattern: Dynamic PV (immediate binding)] topology should provision a volume and schedule a pod with AllowedTopologies",
		"its StorageClass binds Immediately, and the provisioner serves only the claims the scheduler picked a node for (WaitForFirstConsumer: a volume is one node's memory): the claim stays Pending, the pod waits 5 minutes and fails"},
	{"[Testpattern: Dynamic PV (filesystem volmode)] volumeMode should not mount / map unused volumes in a pod [LinuxOnly]",
		"its host-exec pod runs nsenter --mount=/rootfs/proc/1/ns/mnt, which this machine refuses (Permission denied), to list /var/lib/kubelet/pods/UID, a path it hard-codes and the e2e cluster's kubelet does not use (its root is the cluster folder's kubelet/)"},
}

// skipPattern is e2e.test's -ginkgo.skip: storageSuiteSkip and
// storageSuiteSkipSpecs.
func skipPattern() string {
	p := append([]string{}, storageSuiteSkip...)
	for _, s := range storageSuiteSkipSpecs {
		p = append(p, regexp.QuoteMeta(driverName+"] "+s.spec))
	}
	return strings.Join(p, "|")
}

// storageSuiteMustPass are specs that must have run and passed, so that a
// driver definition the suite does not understand (every spec skipped)
// fails the test: the inline volume specs, the generic ephemeral ones, and
// dynamic PV specs of each suite that runs (provisioning with capacity,
// volumes, subPath with the agnhost image, topology, ReadWriteOncePod).
var storageSuiteMustPass = []string{
	"[Testpattern: CSI Ephemeral-volume (default fs)] ephemeral should create read-only inline ephemeral volume",
	"[Testpattern: CSI Ephemeral-volume (default fs)] ephemeral should create read/write inline ephemeral volume",
	"[Testpattern: CSI Ephemeral-volume (default fs)] ephemeral should support two pods which have the same volume definition",
	"[Testpattern: CSI Ephemeral-volume (default fs)] ephemeral should support multiple inline ephemeral volumes",
	"[Testpattern: Generic Ephemeral-volume (default fs) (late-binding)] ephemeral should create read-only inline ephemeral volume",
	"[Testpattern: Generic Ephemeral-volume (default fs) (late-binding)] ephemeral should create read/write inline ephemeral volume",
	"[Testpattern: Generic Ephemeral-volume (default fs) (late-binding)] ephemeral should support two pods which have the same volume definition",
	"[Testpattern: Generic Ephemeral-volume (default fs) (late-binding)] ephemeral should support multiple inline ephemeral volumes",
	"[Testpattern: Dynamic PV (default fs)] capacity provides storage capacity information",
	"[Testpattern: Dynamic PV (default fs)] volumes should store data",
	"[Testpattern: Dynamic PV (default fs)] volumes should allow exec of files on the volume",
	"[Testpattern: Dynamic PV (default fs)] subPath should support existing directory",
	"[Testpattern: Dynamic PV (default fs)] subPath should support file as subpath [LinuxOnly]",
	"[Testpattern: Dynamic PV (delayed binding)] topology should provision a volume and schedule a pod with AllowedTopologies",
	"[Testpattern: Dynamic PV (default fs)] read-write-once-pod [MinimumKubeletVersion:1.27] should block a second pod from using an in-use ReadWriteOncePod volume on the same node",
}

// ginkgoSpec is the part of a Ginkgo v2 JSON report's SpecReport read here
// (github.com/onsi/ginkgo/v2/types.SpecReport).
type ginkgoSpec struct {
	ContainerHierarchyTexts []string
	LeafNodeType            string
	LeafNodeText            string
	State                   string
	RunTime                 time.Duration
	Failure                 struct{ Message string }
}

func (s ginkgoSpec) name() string {
	return strings.Join(append(append([]string{}, s.ContainerHierarchyTexts...), s.LeafNodeText), " ")
}

// TestExternalStorageSuite runs Kubernetes' External Storage suite against
// the installed chart: e2e.test with memfs.yaml as -storage.testdriver,
// focused on this driver, its output and reports saved in
// bin/e2e/storage-suite. It fails when a spec fails or when a spec of
// storageSuiteMustPass did not pass. The chart's provisioner is enabled
// for it (provisionerValues) and off again at the end.
func TestExternalStorageSuite(t *testing.T) {
	requireCluster(t)
	bin := e2eTestBinary(t)
	out := filepath.Join(repoRoot, "bin", "e2e", "storage-suite")
	if err := os.RemoveAll(out); err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(out, 0o755); err != nil {
		t.Fatal(err)
	}
	tagTestImage(t, bin)

	driver, err := os.ReadFile(filepath.Join(repoRoot, storageSuiteDir, "memfs.yaml"))
	if err != nil {
		t.Fatal(err)
	}
	upgradePlugin(t, provisionerValues...)
	t.Cleanup(func() { upgradePlugin(t, provisionerOffValues...) })
	driverFile := filepath.Join(out, "memfs.yaml")
	if err := os.WriteFile(driverFile, driver, 0o644); err != nil {
		t.Fatal(err)
	}

	ctx := context.Background()
	if d, ok := t.Deadline(); ok {
		var cancel context.CancelFunc
		ctx, cancel = context.WithDeadline(ctx, d.Add(-time.Minute))
		defer cancel()
	}
	report := filepath.Join(out, "report.json")
	logFile := filepath.Join(out, "e2e.log")
	log, err := os.Create(logFile)
	if err != nil {
		t.Fatal(err)
	}
	defer log.Close()
	cmd := exec.CommandContext(ctx, bin,
		"-kubeconfig", cl.kubeconfig,
		"-storage.testdriver", driverFile,
		"-repo-root", repoRoot,
		"-report-dir", out,
		"-ginkgo.focus", storageSuiteFocus,
		"-ginkgo.skip", skipPattern(),
		"-ginkgo.json-report", report,
		"-ginkgo.timeout", "30m",
		"-ginkgo.no-color", "-ginkgo.v")
	cmd.Stdout, cmd.Stderr = log, log
	t.Logf("running %s (output: %s)", strings.Join(cmd.Args, " "), logFile)
	start := time.Now()
	runErr := cmd.Run()
	t.Logf("e2e.test ran %s: %v", time.Since(start).Round(time.Second), runErr)

	specs := readGinkgoReport(t, report)
	summary := summarize(specs)
	if err := os.WriteFile(filepath.Join(out, "summary.txt"), []byte(summary), 0o644); err != nil {
		t.Error(err)
	}
	t.Log("\n" + summary)

	states := map[string]string{}
	for _, s := range specs {
		states[s.name()] = s.State
	}
	for _, want := range storageSuiteMustPass {
		found := false
		for name, state := range states {
			if strings.HasSuffix(name, want) {
				found = true
				if state != "passed" {
					t.Errorf("%s: %s, want passed", name, state)
				}
			}
		}
		if !found {
			t.Errorf("no spec %q ran", want)
		}
	}
	if runErr != nil {
		t.Errorf("e2e.test: %v (output: %s)", runErr, logFile)
	}
}

// e2eTestBinary is E2E_TEST_BIN, or the cached e2e.test that
// build-e2e-test.sh prints (building it first if needed: 15-40 minutes).
func e2eTestBinary(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("E2E_TEST_BIN"); bin != "" {
		return bin
	}
	t.Log("E2E_TEST_BIN is not set: test/e2e/build-e2e-test.sh (cached, or a long build)")
	cmd := exec.Command("bash", "test/e2e/build-e2e-test.sh")
	cmd.Dir = repoRoot
	cmd.Stderr = os.Stderr
	b, err := cmd.Output()
	if err != nil {
		t.Fatalf("build-e2e-test.sh: %v", err)
	}
	return strings.TrimSpace(string(b))
}

// testImages are the e2e-test-images the selected specs run (as
// e2e.test -list-images names them: REPO:TAG) and the imported image
// tagTestImage gives each name, since pods on the e2e cluster cannot pull.
var testImages = []struct{ repo, image string }{
	// e2epod.GetDefaultTestImage: the specs' shell commands.
	{"e2e-test-images/busybox", workload},
	// "volumes should allow exec of files on the volume" runs /bin/sh -c
	// in the nginx image, nothing of nginx.
	{"e2e-test-images/nginx", workload},
	// subPath's containers run agnhost mounttest and shell commands.
	{"e2e-test-images/agnhost", agnhostImage},
}

// tagTestImage tags the imported images with the names of testImages.
func tagTestImage(t *testing.T, bin string) {
	t.Helper()
	b, err := exec.Command(bin, "-list-images").Output()
	if err != nil {
		t.Fatalf("e2e.test -list-images: %v", err)
	}
	for _, ti := range testImages {
		var names []string
		for _, img := range strings.Fields(string(b)) {
			if i := strings.LastIndex(img, ":"); i > 0 && strings.HasSuffix(img[:i], "/"+ti.repo) {
				names = append(names, img)
			}
		}
		if len(names) == 0 {
			t.Fatalf("e2e.test -list-images names no %s image:\n%s", ti.repo, b)
		}
		for _, name := range names {
			ctr := exec.Command("ctr", "--address", filepath.Join(cl.dir, "containerd", "containerd.sock"),
				"-n", "k8s.io", "images", "tag", "--force", ti.image, name)
			if out, err := ctr.CombinedOutput(); err != nil {
				t.Fatalf("%s: %v\n%s", strings.Join(ctr.Args, " "), err, out)
			}
		}
	}
}

// upgradePlugin runs helm upgrade --reuse-values with the given values, as
// TestGenericEphemeralVolume does: the plugin pod is replaced, its volumes
// handed over.
func upgradePlugin(t *testing.T, values ...string) {
	t.Helper()
	args := append([]string{"upgrade", "csi-memfs", "charts/csi-memfs", "--namespace", pluginNS, "--reuse-values"}, values...)
	args = append(args, "--wait", "--timeout", "4m")
	if out, err := helmCmd(args...); err != nil {
		t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
	}
	if err := waitRegistered(); err != nil {
		t.Fatalf("plugin not registered after the upgrade: %v", err)
	}
}

// readGinkgoReport returns the It specs of the report that name the
// driver: those the focus selected, run or skipped.
func readGinkgoReport(t *testing.T, file string) []ginkgoSpec {
	t.Helper()
	b, err := os.ReadFile(file)
	if err != nil {
		t.Fatalf("no report: %v", err)
	}
	var reports []struct{ SpecReports []ginkgoSpec }
	if err := json.Unmarshal(b, &reports); err != nil {
		t.Fatalf("%s: %v", file, err)
	}
	var specs []ginkgoSpec
	for _, r := range reports {
		for _, s := range r.SpecReports {
			if s.LeafNodeType == "It" && strings.Contains(s.name(), driverName) {
				specs = append(specs, s)
			}
		}
	}
	return specs
}

// summarize counts the specs by state, and the skipped ones by reason
// (the message of e2eskipper.Skipf, or not selected), and
// lists every spec that ran.
func summarize(specs []ginkgoSpec) string {
	var b strings.Builder
	count := map[string]int{}
	reasons := map[string]int{}
	var ran []string
	for _, s := range specs {
		count[s.State]++
		if s.State != "skipped" {
			ran = append(ran, fmt.Sprintf("%-8s %6s  %s", s.State, s.RunTime.Round(time.Second), s.name()))
			continue
		}
		reason := strings.TrimSpace(strings.SplitN(s.Failure.Message, "\n", 2)[0])
		for _, sk := range storageSuiteSkipSpecs {
			if reason == "" && strings.HasSuffix(s.name(), sk.spec) {
				reason = "storageSuiteSkipSpecs: " + sk.why
			}
		}
		if reason == "" {
			reason = "not selected by storageSuiteFocus and storageSuiteSkip (or the run was interrupted)"
		}
		reasons[reason]++
	}
	states := make([]string, 0, len(count))
	for s := range count {
		states = append(states, s)
	}
	sort.Strings(states)
	fmt.Fprintf(&b, "%d specs for %s:", len(specs), driverName)
	for _, s := range states {
		fmt.Fprintf(&b, " %d %s", count[s], s)
	}
	b.WriteString("\n\nran:\n")
	sort.Strings(ran)
	for _, r := range ran {
		b.WriteString("  " + r + "\n")
	}
	b.WriteString("\nskipped, by reason:\n")
	rs := make([]string, 0, len(reasons))
	for r := range reasons {
		rs = append(rs, r)
	}
	sort.Slice(rs, func(i, j int) bool {
		return reasons[rs[i]] > reasons[rs[j]] || reasons[rs[i]] == reasons[rs[j]] && rs[i] < rs[j]
	})
	for _, r := range rs {
		fmt.Fprintf(&b, "  %4d  %s\n", reasons[r], r)
	}
	return b.String()
}
