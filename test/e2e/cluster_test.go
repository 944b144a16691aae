//go:build e2e

package e2e

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"io"
	"net/http"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"testing"
	"text/template"
	"time"
)

// The cluster the suite runs against: test/e2e/run.sh starts it with
// cluster.sh and passes its folder as E2E_CLUSTER_DIR.
var cl struct {
	dir, kubeconfig, kubeletDir, nodeName, nodeIP, bin string
}

const (
	driverName  = "memfs.csi.dev"
	pluginNS    = "csi-memfs"
	testNS      = "e2e"
	workload    = "docker.io/csi-memfs/e2e-workload:e2e"
	metricsPort = 29809
	nodeBudget  = 512 << 20
)

// helmInstallArgs is the `helm install` the suite runs (e2eHelmInstall,
// which docs/install.md shows), the cluster folder filled in.
func helmInstallArgs() []string {
	args := make([]string, len(e2eHelmInstall))
	for i, a := range e2eHelmInstall {
		args[i] = strings.ReplaceAll(a, "$E2E_CLUSTER_DIR", cl.dir)
	}
	return args
}

func TestMain(m *testing.M) {
	cl.dir = os.Getenv("E2E_CLUSTER_DIR")
	if cl.dir == "" {
		fmt.Println("e2e: E2E_CLUSTER_DIR is not set: run test/e2e/run.sh (make e2e), which starts a cluster")
		// Only the chart tests (no cluster) run.
		os.Exit(m.Run())
	}
	env, err := os.ReadFile(filepath.Join(cl.dir, "env"))
	if err != nil {
		fmt.Println("e2e:", err)
		os.Exit(1)
	}
	for _, line := range strings.Split(string(env), "\n") {
		k, v, ok := strings.Cut(strings.TrimPrefix(line, "export "), "=")
		if !ok {
			continue
		}
		switch k {
		case "KUBECONFIG":
			cl.kubeconfig = v
		case "KUBELET_DIR":
			cl.kubeletDir = v
		case "NODE_NAME":
			cl.nodeName = v
		case "NODE_IP":
			cl.nodeIP = v
		case "K8S_BIN":
			cl.bin = v
		}
	}
	code := setUp()
	if code == 0 {
		code = m.Run()
	}
	if tearDown() != 0 && code == 0 {
		code = 1
	}
	os.Exit(code)
}

// setUp installs the chart with Helm and waits for kubelet to register the
// plugin.
func setUp() int {
	start := time.Now()
	dryRunDeploy()
	args := helmInstallArgs()
	if out, err := helmCmd(args...); err != nil {
		fmt.Printf("e2e: helm %s: %v\n%s\n", strings.Join(args, " "), err, out)
		dumpPlugin()
		return 1
	}
	fmt.Printf("e2e: helm install took %s\n", time.Since(start).Round(time.Second))
	if err := waitRegistered(); err != nil {
		fmt.Printf("e2e: %v\n", err)
		return 1
	}
	if out, err := kubectl("create", "namespace", testNS); err != nil {
		fmt.Printf("e2e: %v\n%s\n", err, out)
		return 1
	}
	// The admission plugin wants the namespace's default service account.
	if err := poll(time.Minute, func() (bool, error) {
		_, err := kubectl("-n", testNS, "get", "serviceaccount", "default")
		return err == nil, nil
	}); err != nil {
		fmt.Printf("e2e: no default service account in %s\n", testNS)
		return 1
	}
	fmt.Printf("e2e: plugin installed and registered in %s\n", time.Since(start).Round(time.Second))
	return 0
}

// tearDown deletes the test pods (their volumes need the plugin), then
// uninstalls the chart, and checks that no volume mount is left.
func tearDown() int {
	code := 0
	if out, err := kubectl("delete", "namespace", testNS, "--ignore-not-found", "--timeout=3m"); err != nil {
		fmt.Printf("e2e: deleting namespace %s: %v\n%s\n", testNS, err, out)
		code = 1
	}
	if out, err := helmCmd("uninstall", "csi-memfs", "--namespace", pluginNS, "--wait", "--timeout", "3m"); err != nil {
		fmt.Printf("e2e: helm uninstall: %v\n%s\n", err, out)
		code = 1
	}
	if left := mountsUnder(filepath.Join(cl.kubeletDir, "pods"), filepath.Join(cl.dir, "csi-memfs")); len(left) > 0 {
		fmt.Printf("e2e: mounts left after the test pods and the plugin were deleted:\n  %s\n", strings.Join(left, "\n  "))
		code = 1
	}
	return code
}

// requireCluster skips a test when no cluster was started.
func requireCluster(t *testing.T) {
	t.Helper()
	if cl.dir == "" {
		t.Skip("no cluster: run test/e2e/run.sh (make e2e)")
	}
}

func kubectl(args ...string) (string, error) {
	return kubectlIn(nil, args...)
}

// kubectlIn runs kubectl and returns its standard output, followed by its
// standard error when it fails. kubectl's own log lines go to standard
// error even when it succeeds (an exec's "Unknown stream id 1, discarding
// message", once seen in CI), so they are kept out of a command's output.
func kubectlIn(stdin io.Reader, args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(cl.bin, "kubectl"), append([]string{"--kubeconfig", cl.kubeconfig}, args...)...)
	cmd.Stdin = stdin
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	err := cmd.Run()
	if err != nil {
		stdout.Write(stderr.Bytes())
	}
	return stdout.String(), err
}

func helmCmd(args ...string) (string, error) {
	cmd := exec.Command("bash", append([]string{"test/e2e/helm.sh"}, args...)...)
	cmd.Dir = repoRoot
	cmd.Env = append(os.Environ(), "KUBECONFIG="+cl.kubeconfig)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// poll calls f every half second until it reports done, returns an error,
// or timeout passes.
func poll(timeout time.Duration, f func() (bool, error)) error {
	deadline := time.Now().Add(timeout)
	for {
		done, err := f()
		if err != nil {
			return err
		}
		if done {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("timed out after %s", timeout)
		}
		time.Sleep(500 * time.Millisecond)
	}
}

// waitRegistered waits for the node's CSINode to list the driver; when it
// does not, it prints the plugin pods and what kubelet logged about plugin
// registration.
func waitRegistered() error {
	err := poll(2*time.Minute, func() (bool, error) {
		out, err := kubectl("get", "csinode", cl.nodeName, "-o", "jsonpath={.spec.drivers[*].name}")
		return err == nil && strings.Contains(out, driverName), nil
	})
	if err == nil {
		return nil
	}
	dumpPlugin()
	if log, rerr := os.ReadFile(filepath.Join(cl.dir, "logs", "kubelet.log")); rerr == nil {
		fmt.Println("kubelet, on plugin registration:")
		for _, line := range strings.Split(string(log), "\n") {
			if strings.Contains(line, "egist") && (strings.Contains(line, driverName) || strings.Contains(line, "plugin")) {
				fmt.Println(" ", line)
			}
		}
	}
	return fmt.Errorf("kubelet did not register %s: %w", driverName, err)
}

// dumpPlugin prints the plugin pods' state and logs.
func dumpPlugin() {
	out, _ := kubectl("-n", pluginNS, "get", "pods", "-o", "wide")
	fmt.Println(out)
	out, _ = kubectl("-n", pluginNS, "describe", "pods")
	fmt.Println(out)
	out, _ = kubectl("-n", pluginNS, "logs", "-l", "app.kubernetes.io/name=csi-memfs", "--tail=80", "--all-containers")
	fmt.Println(out)
}

// pod describes a test pod with one csi-memfs volume at /data.
type pod struct {
	Name       string
	Attrs      map[string]string
	ReadOnly   bool
	RunAsUser  int
	FSGroup    int
	SecretName string
	Command    string
}

var podTemplate = template.Must(template.New("pod").Parse(`apiVersion: v1
kind: Pod
metadata:
  name: {{.Name}}
  namespace: ` + testNS + `
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  {{- if or .RunAsUser .FSGroup}}
  securityContext:
    {{- if .RunAsUser}}
    runAsUser: {{.RunAsUser}}
    runAsGroup: {{.RunAsUser}}
    {{- end}}
    {{- if .FSGroup}}
    fsGroup: {{.FSGroup}}
    {{- end}}
  {{- end}}
  containers:
    - name: app
      image: ` + workload + `
      imagePullPolicy: Never
      command: ["sh", "-c", {{printf "%q" .Command}}]
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      csi:
        driver: ` + driverName + `
        {{- if .ReadOnly}}
        readOnly: true
        {{- end}}
        {{- if .SecretName}}
        nodePublishSecretRef:
          name: {{.SecretName}}
        {{- end}}
        {{- if .Attrs}}
        volumeAttributes:
          {{- range $k, $v := .Attrs}}
          {{$k}}: {{printf "%q" $v}}
          {{- end}}
        {{- end}}
`))

// createPod creates p and returns without waiting.
func createPod(t *testing.T, p pod) {
	t.Helper()
	if p.Command == "" {
		p.Command = "sleep 3600"
	}
	var b bytes.Buffer
	if err := podTemplate.Execute(&b, p); err != nil {
		t.Fatal(err)
	}
	if out, err := kubectlIn(&b, "apply", "-f", "-"); err != nil {
		t.Fatalf("creating pod %s: %v\n%s", p.Name, err, out)
	}
}

// runPod creates p, waits for it to run, and deletes it when the test ends.
func runPod(t *testing.T, p pod) {
	t.Helper()
	createPod(t, p)
	t.Cleanup(func() { deletePod(t, p.Name) })
	waitRunning(t, p.Name)
}

func waitRunning(t *testing.T, name string) {
	t.Helper()
	err := poll(3*time.Minute, func() (bool, error) {
		out, err := kubectl("-n", testNS, "get", "pod", name, "-o", "jsonpath={.status.phase}")
		if err == nil && (out == "Failed" || out == "Succeeded") {
			return false, fmt.Errorf("pod %s is %s", name, out)
		}
		return err == nil && out == "Running", nil
	})
	if err != nil {
		out, _ := kubectl("-n", testNS, "describe", "pod", name)
		t.Fatalf("pod %s not running: %v\n%s", name, err, out)
	}
}

// deletePod deletes a pod and waits until it is gone: kubelet has
// unpublished its volume.
func deletePod(t *testing.T, name string) {
	t.Helper()
	out, err := kubectl("-n", testNS, "delete", "pod", name, "--ignore-not-found", "--timeout=2m")
	if err != nil {
		t.Errorf("deleting pod %s: %v\n%s", name, err, out)
	}
}

// podExec runs script in the pod's container and returns its output and
// exit error.
func podExec(t *testing.T, name, script string) (string, error) {
	t.Helper()
	return kubectl("-n", testNS, "exec", name, "-c", "app", "--", "sh", "-c", script)
}

// mustExec is podExec that fails the test on a non-zero exit.
func mustExec(t *testing.T, name, script string) string {
	t.Helper()
	out, err := podExec(t, name, script)
	if err != nil {
		t.Fatalf("in pod %s: %s: %v\n%s", name, script, err, out)
	}
	return out
}

func podUID(t *testing.T, name string) string {
	t.Helper()
	out, err := kubectl("-n", testNS, "get", "pod", name, "-o", "jsonpath={.metadata.uid}")
	if err != nil || out == "" {
		t.Fatalf("uid of pod %s: %v %s", name, err, out)
	}
	return out
}

// podEvents returns the messages of the pod's events.
func podEvents(name string) string {
	out, _ := kubectl("-n", testNS, "get", "events", "--field-selector", "involvedObject.name="+name,
		"-o", "jsonpath={range .items[*]}{.reason}: {.message}{\"\\n\"}{end}")
	return out
}

// waitEvent waits for an event of the pod whose message matches re.
func waitEvent(t *testing.T, name string, re *regexp.Regexp) string {
	t.Helper()
	var ev string
	err := poll(2*time.Minute, func() (bool, error) {
		ev = podEvents(name)
		return re.MatchString(ev), nil
	})
	if err != nil {
		t.Fatalf("pod %s: no event matching %s; events:\n%s", name, re, ev)
	}
	return re.FindString(ev)
}

// mountsUnder lists the mount points under any of dirs.
func mountsUnder(dirs ...string) []string {
	b, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		return []string{err.Error()}
	}
	var found []string
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) < 5 {
			continue
		}
		mp := strings.ReplaceAll(f[4], `\040`, " ")
		for _, d := range dirs {
			if strings.HasPrefix(mp+"/", strings.TrimSuffix(d, "/")+"/") && mp != d {
				found = append(found, mp)
			}
		}
	}
	return found
}

// sample is one series of a scrape.
type sample struct {
	labels string
	value  float64
}

// scrape reads the plugin's /metrics on the node's loopback address (the
// plugin pod uses the host network) into series by metric name.
func scrape(t *testing.T) map[string][]sample {
	t.Helper()
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/metrics", metricsPort))
	if err != nil {
		t.Fatalf("scraping the plugin: %v", err)
	}
	defer resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Fatalf("scraping the plugin: %s", resp.Status)
	}
	series := map[string][]sample{}
	sc := bufio.NewScanner(resp.Body)
	sc.Buffer(make([]byte, 1<<20), 1<<20)
	line := regexp.MustCompile(`^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{.*\})? (\S+)`)
	for sc.Scan() {
		m := line.FindStringSubmatch(sc.Text())
		if m == nil {
			continue
		}
		v, err := strconv.ParseFloat(m[3], 64)
		if err != nil {
			continue
		}
		series[m[1]] = append(series[m[1]], sample{labels: m[2], value: v})
	}
	return series
}

// value returns the value of the series of name whose labels contain all
// of the given label matchers (`pod_name="x"`), and whether there is one.
func value(series map[string][]sample, name string, matchers ...string) (float64, bool) {
next:
	for _, s := range series[name] {
		for _, m := range matchers {
			if !strings.Contains(s.labels, m) {
				continue next
			}
		}
		return s.value, true
	}
	return 0, false
}

// ---- The tests, in the order they run. ----

func TestInstall(t *testing.T) {
	requireCluster(t)
	out, err := kubectl("get", "csidriver", driverName, "-o",
		"jsonpath={.spec.attachRequired} {.spec.podInfoOnMount} {.spec.volumeLifecycleModes} {.spec.fsGroupPolicy}")
	if err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if want := `false true ["Ephemeral","Persistent"] File`; out != want {
		t.Errorf("CSIDriver spec = %q, want %q", out, want)
	}
	resp, err := http.Get(fmt.Sprintf("http://127.0.0.1:%d/healthz", metricsPort))
	if err != nil {
		t.Fatalf("/healthz: %v", err)
	}
	resp.Body.Close()
	if resp.StatusCode != http.StatusOK {
		t.Errorf("/healthz: %s", resp.Status)
	}
	// Registered by the plugin itself (no registrar sidecar); the holder
	// beside it.
	out, _ = kubectl("-n", pluginNS, "get", "pods", "-o", "jsonpath={.items[*].spec.containers[*].name}")
	if out != "holder csi-memfs" {
		t.Errorf("plugin pod containers = %q, want holder and csi-memfs", out)
	}
	// The holder runs unprivileged, listening on its socket in the state
	// directory, and sees the plugin's mounts go (HostToContainer).
	sock := filepath.Join(cl.dir, "csi-memfs", "state", "holder.sock")
	if fi, err := os.Stat(sock); err != nil || fi.Mode()&os.ModeSocket == 0 || fi.Mode().Perm() != 0o600 {
		t.Errorf("holder socket %s: %v, %v; want a socket of mode 0600", sock, fi, err)
	}
	out, _ = kubectl("-n", pluginNS, "get", "pods", "-o",
		`jsonpath={.items[*].status.containerStatuses[?(@.name=="holder")].ready}`)
	if out != "true" {
		t.Errorf("holder container ready = %q, want true", out)
	}
}

// deployDryRun holds the apiserver's verdict on deploy/ and the example
// pods, taken by setUp before the chart is installed (a server-side dry
// run: validation and admission, nothing created; after the install the
// objects would exist already).
var deployDryRun []string

func dryRunDeploy() {
	// A dry run creates no namespace: the namespaced objects need it.
	if out, err := kubectl("create", "namespace", pluginNS); err != nil {
		deployDryRun = append(deployDryRun, fmt.Sprintf("kubectl create namespace %s: %v\n%s", pluginNS, err, out))
		return
	}
	for _, args := range [][]string{
		{"apply", "--dry-run=server", "-f", filepath.Join(repoRoot, "deploy")},
		{"apply", "--dry-run=server", "-n", "default", "-f", filepath.Join(repoRoot, "deploy", "examples")},
	} {
		if out, err := kubectl(args...); err != nil {
			deployDryRun = append(deployDryRun, fmt.Sprintf("kubectl %s: %v\n%s", strings.Join(args, " "), err, out))
		}
	}
}

// TestDeployManifests: the apiserver accepts deploy/ and the example pods.
func TestDeployManifests(t *testing.T) {
	requireCluster(t)
	for _, e := range deployDryRun {
		t.Error(e)
	}
}

func TestMemoryVolume(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "memory", Attrs: map[string]string{"size": "16Mi", "inodes": "2000"}})

	out := mustExec(t, "memory", "echo hello > /data/hello && cat /data/hello")
	if strings.TrimSpace(out) != "hello" {
		t.Errorf("read back %q, want hello", out)
	}
	// df shows the volume's size: 16 MiB = 16384 KiB.
	out = mustExec(t, "memory", "df -kP /data | tail -1")
	if f := strings.Fields(out); len(f) < 2 || f[1] != "16384" {
		t.Errorf("df -k /data: %q, want 16384 1K-blocks", out)
	}
	// Writing past the limit fails with ENOSPC and keeps what was written.
	out, err := podExec(t, "memory", "dd if=/dev/zero of=/data/big bs=1M count=32 2>&1")
	if err == nil || !strings.Contains(out, "No space left on device") {
		t.Errorf("dd of 32 MiB into a 16 MiB volume: err %v, output %q; want ENOSPC", err, out)
	}
	out = mustExec(t, "memory", "cat /data/hello && stat -c %s /data/big")
	f := strings.Fields(out)
	if len(f) != 2 || f[0] != "hello" {
		t.Fatalf("after ENOSPC: %q", out)
	}
	if n, _ := strconv.Atoi(f[1]); n < 8<<20 || n > 16<<20 {
		t.Errorf("big file is %d bytes after ENOSPC, want most of 16 MiB", n)
	}
	// Deleting frees the space.
	mustExec(t, "memory", "rm /data/big && dd if=/dev/zero of=/data/again bs=1M count=8 2>&1")
	// The inode limit holds too.
	out, err = podExec(t, "memory", "i=0; while [ $i -lt 2100 ]; do touch /data/f$i || exit 1; i=$((i+1)); done")
	if err == nil || !strings.Contains(out, "No space left on device") {
		t.Errorf("2100 files in a volume of 2000 inodes: err %v, output %q; want ENOSPC", err, out)
	}
}

func TestReadOnlyVolume(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "readonly", ReadOnly: true})
	out, err := podExec(t, "readonly", "touch /data/x 2>&1")
	if err == nil || !strings.Contains(out, "Read-only file system") {
		t.Errorf("touch on a readOnly volume: err %v, output %q; want EROFS", err, out)
	}
	out = mustExec(t, "readonly", "grep ' /data ' /proc/mounts")
	if !strings.Contains(out, " ro,") && !strings.Contains(out, " ro ") {
		t.Errorf("/data is not mounted read-only: %q", out)
	}
}

func TestFSGroupNonRoot(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "fsgroup", RunAsUser: 1000, FSGroup: 2000})
	out := mustExec(t, "fsgroup", "id -u && echo data > /data/mine && stat -c '%g %u' /data /data/mine")
	f := strings.Fields(out)
	if len(f) != 5 || f[0] != "1000" || f[1] != "2000" || f[3] != "2000" && f[3] != "1000" || f[4] != "1000" {
		t.Errorf("uid, volume root gid, file gid and uid = %q; want 1000, root gid 2000, file owned by 1000", out)
	}
}

func TestSealedFile(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "sealed"})
	mustExec(t, "sealed", "echo 'key: value' > /data/config.yaml")
	if out := mustExec(t, "sealed", "sealtool /data/config.yaml write,grow,shrink,seal"); !strings.Contains(out, "write") {
		t.Errorf("seals after sealing: %q", out)
	}
	// The pod (root in its container) cannot change the file any more.
	for _, script := range []string{
		"echo more >> /data/config.yaml",
		"echo other > /data/config.yaml",
		"truncate -s 0 /data/config.yaml",
		"sealtool /data/config.yaml write", // no new seals after seal
	} {
		out, err := podExec(t, "sealed", script+" 2>&1")
		if err == nil {
			t.Errorf("%s on a sealed file succeeded: %q", script, out)
		}
	}
	if out := mustExec(t, "sealed", "cat /data/config.yaml"); strings.TrimSpace(out) != "key: value" {
		t.Errorf("sealed file now reads %q", out)
	}
	s := scrape(t)
	if v, _ := value(s, "csi_memfs_volume_seal_violations_total", `pod_name="sealed"`); v < 1 {
		t.Errorf("csi_memfs_volume_seal_violations_total for the pod = %v, want > 0", v)
	}
}

func TestPodsDoNotShareVolumes(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "share-a"})
	runPod(t, pod{Name: "share-b"})
	mustExec(t, "share-a", "echo a > /data/who")
	if out, err := podExec(t, "share-b", "cat /data/who 2>&1"); err == nil {
		t.Errorf("pod b sees pod a's file: %q", out)
	}
}

func TestStatsSummary(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "stats", Attrs: map[string]string{"size": "32Mi"}})
	mustExec(t, "stats", "dd if=/dev/zero of=/data/blob bs=1M count=5 2>&1")
	type volStats struct {
		Name          string `json:"name"`
		UsedBytes     int64  `json:"usedBytes"`
		CapacityBytes int64  `json:"capacityBytes"`
	}
	var got volStats
	err := poll(2*time.Minute, func() (bool, error) {
		out, err := kubectl("get", "--raw", "/api/v1/nodes/"+cl.nodeName+"/proxy/stats/summary")
		if err != nil {
			return false, nil
		}
		var summary struct {
			Pods []struct {
				PodRef struct{ Name, Namespace string } `json:"podRef"`
				Volume []volStats                       `json:"volume"`
			} `json:"pods"`
		}
		if err := json.Unmarshal([]byte(out), &summary); err != nil {
			return false, err
		}
		for _, p := range summary.Pods {
			if p.PodRef.Namespace == testNS && p.PodRef.Name == "stats" {
				for _, v := range p.Volume {
					if v.Name == "data" {
						got = v
						return v.UsedBytes >= 5<<20, nil
					}
				}
			}
		}
		return false, nil
	})
	if err != nil {
		t.Fatalf("kubelet /stats/summary never showed 5 MiB used in the pod's volume (last: %+v): %v", got, err)
	}
	if got.CapacityBytes != 32<<20 {
		t.Errorf("stats/summary capacity = %d, want %d", got.CapacityBytes, 32<<20)
	}
}

func TestPodDeletionFreesMemory(t *testing.T) {
	requireCluster(t)
	before := scrape(t)
	usedBefore, _ := value(before, "csi_memfs_node_used_bytes")
	reservedBefore, _ := value(before, "csi_memfs_node_reserved_bytes")

	createPod(t, pod{Name: "free", Attrs: map[string]string{"size": "64Mi"}})
	t.Cleanup(func() { deletePod(t, "free") })
	waitRunning(t, "free")
	uid := podUID(t, "free")
	mustExec(t, "free", "dd if=/dev/zero of=/data/blob bs=1M count=20 2>&1")

	during := scrape(t)
	if v, ok := value(during, "csi_memfs_volume_used_bytes", `pod_name="free"`, `pod_namespace="`+testNS+`"`); !ok || v < 20<<20 {
		t.Errorf("csi_memfs_volume_used_bytes for the pod = %v (found %v), want >= 20 MiB", v, ok)
	}
	if v, _ := value(during, "csi_memfs_node_reserved_bytes"); v-reservedBefore != 64<<20 {
		t.Errorf("node reserved grew by %v, want 64 MiB", v-reservedBefore)
	}
	podDir := filepath.Join(cl.kubeletDir, "pods", uid)
	if len(mountsUnder(podDir)) == 0 {
		t.Errorf("no mount under %s while the pod runs", podDir)
	}

	deletePod(t, "free")
	after := scrape(t)
	if _, ok := value(after, "csi_memfs_volume_used_bytes", `pod_name="free"`); ok {
		t.Errorf("the deleted pod's volume still has series")
	}
	if v, _ := value(after, "csi_memfs_node_used_bytes"); v > usedBefore {
		t.Errorf("node bytes used %v after deletion, %v before", v, usedBefore)
	}
	if v, _ := value(after, "csi_memfs_node_reserved_bytes"); v != reservedBefore {
		t.Errorf("node bytes reserved %v after deletion, %v before", v, reservedBefore)
	}
	if left := mountsUnder(podDir); len(left) > 0 {
		t.Errorf("mounts left after the pod was deleted: %v", left)
	}
}

func TestNodeBudget(t *testing.T) {
	requireCluster(t)
	// The budget is 512Mi (helmInstallArgs): a 400Mi volume fits, a second
	// does not.
	runPod(t, pod{Name: "budget-a", Attrs: map[string]string{"size": "400Mi"}})
	createPod(t, pod{Name: "budget-b", Attrs: map[string]string{"size": "400Mi"}})
	t.Cleanup(func() { deletePod(t, "budget-b") })
	waitEvent(t, "budget-b", regexp.MustCompile(`ResourceExhausted[^\n]*`))
	// Bad input is refused, naming the attribute.
	createPod(t, pod{Name: "bad-size", Attrs: map[string]string{"size": "lots"}})
	t.Cleanup(func() { deletePod(t, "bad-size") })
	ev := waitEvent(t, "bad-size", regexp.MustCompile(`InvalidArgument[^\n]*`))
	if !strings.Contains(ev, "size") {
		t.Errorf("InvalidArgument event does not name the attribute: %q", ev)
	}
}

// ---- Image volumes: skipped until the driver serves them. ----

func TestImageVolumeWithPullSecret(t *testing.T) {
	requireCluster(t)
	reg := startRegistry(t)
	ref := reg.push(t, "e2e/content:v1", map[string]string{
		"content/hello.txt":   "hello from the image\n",
		"content/config.json": `{"mode":"sealed"}` + "\n",
	})
	reg.secret(t, "registry-creds")

	createPod(t, pod{Name: "image", SecretName: "registry-creds",
		Attrs: map[string]string{"image": ref, "imagePath": "/content", "size": "16Mi", "seal": "*.json"}})
	t.Cleanup(func() { deletePod(t, "image") })
	skipUnlessImagesServed(t, "image")
	waitRunning(t, "image")

	if out := mustExec(t, "image", "cat /data/hello.txt"); out != "hello from the image\n" {
		t.Errorf("image file reads %q", out)
	}
	// Writes go to the pod's memory layer; the sealed file stays as it is.
	mustExec(t, "image", "echo changed > /data/hello.txt && echo new > /data/new.txt")
	if out, err := podExec(t, "image", "echo x >> /data/config.json 2>&1"); err == nil {
		t.Errorf("appending to a file sealed by the seal attribute succeeded: %q", out)
	}

	// A second pod of the same image sees the image, not the first pod's
	// writes.
	createPod(t, pod{Name: "image-2", SecretName: "registry-creds",
		Attrs: map[string]string{"image": ref, "imagePath": "/content"}})
	t.Cleanup(func() { deletePod(t, "image-2") })
	waitRunning(t, "image-2")
	if out := mustExec(t, "image-2", "cat /data/hello.txt; ls /data"); strings.Contains(out, "changed") || strings.Contains(out, "new.txt") {
		t.Errorf("second pod of the image sees the first pod's writes: %q", out)
	}

	// Without the secret the pull of an image not yet on the node is
	// refused. (An image already in the node's cache is served without
	// credentials, as kubelet does with IfNotPresent.)
	private := reg.push(t, "e2e/private:v1", map[string]string{"secret.txt": "s3cret\n"})
	createPod(t, pod{Name: "image-nosecret", Attrs: map[string]string{"image": private}})
	t.Cleanup(func() { deletePod(t, "image-nosecret") })
	waitEvent(t, "image-nosecret", regexp.MustCompile(`(?i)(unauthorized|denied|authentication|NotFound|PermissionDenied)[^\n]*`))
}

// TestKernelCacheImageVolume: a readOnly image volume with kernelCache
// mounts read-only and reads the image, twice (the second time from the
// kernel's cache); the same attribute on a writable volume is refused
// with an event naming it.
func TestKernelCacheImageVolume(t *testing.T) {
	requireCluster(t)
	reg := startRegistry(t)
	ref := reg.push(t, "e2e/libs:v1", map[string]string{
		"lib/a.py": "print('a')\n",
		"lib/b.py": "print('b')\n",
	})
	reg.secret(t, "libs-creds")
	runPod(t, pod{Name: "kernel-cache", SecretName: "libs-creds", ReadOnly: true,
		Attrs: map[string]string{"image": ref, "kernelCache": "true"}})
	for range 2 {
		if out := mustExec(t, "kernel-cache", "cat /data/lib/a.py /data/lib/b.py"); out != "print('a')\nprint('b')\n" {
			t.Errorf("image files read %q", out)
		}
	}
	if out := mustExec(t, "kernel-cache", "grep ' /data ' /proc/mounts"); !strings.Contains(out, " ro,") && !strings.Contains(out, " ro ") {
		t.Errorf("/data is not mounted read-only: %q", out)
	}
	createPod(t, pod{Name: "kernel-cache-rw", SecretName: "libs-creds",
		Attrs: map[string]string{"image": ref, "kernelCache": "true"}})
	t.Cleanup(func() { deletePod(t, "kernel-cache-rw") })
	waitEvent(t, "kernel-cache-rw", regexp.MustCompile(`volumeAttributes\.kernelCache[^\n]*read-only volume`))
}

// imagesServed is set once an image volume was published.
var imagesServed bool

// skipUnlessImagesServed skips the test while the driver answers image
// volumes with Unimplemented (docs/driver.md: validated, not yet served).
func skipUnlessImagesServed(t *testing.T, podName string) {
	t.Helper()
	var ev string
	_ = poll(2*time.Minute, func() (bool, error) {
		out, _ := kubectl("-n", testNS, "get", "pod", podName, "-o", "jsonpath={.status.phase}")
		ev = podEvents(podName)
		return out == "Running" || strings.Contains(ev, "FailedMount"), nil
	})
	if strings.Contains(ev, "Unimplemented") {
		t.Skipf("image volumes are not served yet: the driver answers Unimplemented (%s)",
			regexp.MustCompile(`[^\n]*Unimplemented[^\n]*`).FindString(ev))
	}
	imagesServed = true
}

// TestMetricsSeries: the endpoint serves every series docs/driver.md
// documents and every series the dashboard queries, once volumes have
// been used (after the image test, so that pulls were counted).
func TestMetricsSeries(t *testing.T) {
	requireCluster(t)
	runPod(t, pod{Name: "metrics", Attrs: map[string]string{"size": "8Mi"}})
	// A FUSE error (ENOENT on LOOKUP) and a seal violation.
	podExec(t, "metrics", "ls /data/missing; echo x > /data/f && sealtool /data/f write && echo y >> /data/f")
	s := scrape(t)
	have := func(name string) bool {
		if len(s[name]) > 0 {
			return true
		}
		for _, suf := range []string{"_bucket", "_count", "_sum"} {
			if len(s[name+suf]) > 0 {
				return true
			}
		}
		return false
	}
	var missing []string
	for name := range documentedMetrics(t) {
		if !imagesServed && strings.HasPrefix(name, "csi_memfs_image_") {
			continue // no image volume was published
		}
		if name == "csi_memfs_volume_degraded" {
			continue // a series per reason of a degraded volume: none here
		}
		if !have(name) {
			missing = append(missing, name)
		}
	}
	for _, name := range dashboardSeries(t) {
		if !imagesServed && strings.HasPrefix(name, "csi_memfs_image_") {
			continue
		}
		if !have(name) {
			missing = append(missing, name+" (dashboard)")
		}
	}
	sort.Strings(missing)
	if len(missing) > 0 {
		t.Errorf("the plugin's /metrics lacks: %v", missing)
	}
	if v, ok := value(s, "csi_memfs_csi_operations_total", `method="NodePublishVolume"`, `code="OK"`); !ok || v < 1 {
		t.Errorf("no successful NodePublishVolume counted")
	}
	if v, _ := value(s, "csi_memfs_node_budget_bytes"); v != nodeBudget {
		t.Errorf("csi_memfs_node_budget_bytes = %v, want %d", v, nodeBudget)
	}
}

// TestDaemonSetRestart runs after the volume tests (only the restart tests
// of restart_test.go come after it): the plugin is restarted; a pod created
// before the restart can still be deleted cleanly, and a new pod's volume
// works.
func TestDaemonSetRestart(t *testing.T) {
	requireCluster(t)
	createPod(t, pod{Name: "before-restart"})
	t.Cleanup(func() { deletePod(t, "before-restart") })
	waitRunning(t, "before-restart")
	uid := podUID(t, "before-restart")
	mustExec(t, "before-restart", "echo old > /data/f")

	oldPods, _ := kubectl("-n", pluginNS, "get", "pods", "-o", "jsonpath={.items[*].metadata.name}")
	if out, err := kubectl("-n", pluginNS, "rollout", "restart", "daemonset/csi-memfs"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if out, err := kubectl("-n", pluginNS, "rollout", "status", "daemonset/csi-memfs", "--timeout=3m"); err != nil {
		dumpPlugin()
		t.Fatalf("rollout: %v\n%s", err, out)
	}
	newPods, _ := kubectl("-n", pluginNS, "get", "pods", "-o", "jsonpath={.items[*].metadata.name}")
	if newPods == oldPods {
		t.Fatalf("plugin pod not replaced: %s", newPods)
	}
	if err := waitRegistered(); err != nil {
		t.Fatalf("after the restart: %v", err)
	}

	runPod(t, pod{Name: "after-restart", Attrs: map[string]string{"size": "8Mi"}})
	if out := mustExec(t, "after-restart", "echo new > /data/f && cat /data/f && df -kP /data | tail -1"); !strings.Contains(out, "new") || !strings.Contains(out, "8192") {
		t.Errorf("new pod's volume after the restart: %q", out)
	}

	deletePod(t, "before-restart")
	if left := mountsUnder(filepath.Join(cl.kubeletDir, "pods", uid)); len(left) > 0 {
		t.Errorf("the pre-restart pod's mounts are left: %v", left)
	}
}
