package e2e

import (
	"bytes"
	"encoding/json"
	"fmt"
	"go/ast"
	"go/parser"
	"go/token"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"
	"testing"
)

// repoRoot is the module root, two levels above this package.
var repoRoot = func() string {
	wd, err := os.Getwd()
	if err != nil {
		panic(err)
	}
	return filepath.Clean(filepath.Join(wd, "..", ".."))
}()

const chartDir = "charts/csi-memfs"

// e2eHelmInstall is the `helm install` the e2e suite runs against its
// cluster ($E2E_CLUSTER_DIR is the cluster's folder). The "Install with
// Helm" documentation shows the same command (TestInstallDocShowsE2ECommand).
var e2eHelmInstall = []string{"install", "csi-memfs", "charts/csi-memfs",
	"--namespace", "csi-memfs", "--create-namespace",
	"--set", "image.tag=e2e", "--set", "image.pullPolicy=Never",
	"--set", "kubeletDir=$E2E_CLUSTER_DIR/kubelet",
	"--set", "stateDir=$E2E_CLUSTER_DIR/csi-memfs/state",
	"--set", "imageCacheDir=$E2E_CLUSTER_DIR/csi-memfs/cache",
	"--set", "driver.nodeMemoryBudget=512Mi",
	"--set", "driver.logLevel=4",
	"--set", "driver.insecureRegistries={127.0.0.1}",
	"--set", "metrics.port=29809",
	"--wait", "--timeout", "5m"}

// TestInstallDocShowsE2ECommand: the install documentation (docs/install.md,
// or the README once it holds the section) shows the command the e2e suite
// runs, so the documented commands are the tested ones.
func TestInstallDocShowsE2ECommand(t *testing.T) {
	var doc string
	for _, f := range []string{"README.md", "docs/install.md"} {
		b, err := os.ReadFile(filepath.Join(repoRoot, f))
		if err == nil && strings.Contains(string(b), "## Install with Helm") {
			doc = string(b)
			break
		}
	}
	if doc == "" {
		t.Fatal("neither README.md nor docs/install.md has an \"Install with Helm\" section")
	}
	// The command as a shell line, continuation backslashes removed.
	flat := strings.Join(strings.Fields(strings.ReplaceAll(doc, "\\\n", " ")), " ")
	want := "helm " + strings.Join(e2eHelmInstall, " ")
	if !strings.Contains(flat, want) {
		t.Errorf("the install documentation does not show the e2e suite's command:\n  %s", want)
	}
	for _, cmd := range []string{
		"helm install csi-memfs charts/csi-memfs --namespace csi-memfs --create-namespace",
		"helm uninstall csi-memfs --namespace csi-memfs --wait",
		"kubectl apply -f deploy/",
	} {
		if !strings.Contains(flat, cmd) {
			t.Errorf("the install documentation lacks %q", cmd)
		}
	}
}

// helm runs test/e2e/helm.sh (Helm v3.19.0, built once and cached) in the
// repository root and returns its combined output.
func helm(t testing.TB, args ...string) (string, error) {
	t.Helper()
	if testing.Short() {
		t.Skip("needs helm (built once from the Go module proxy); skipped with -short")
	}
	cmd := exec.Command("bash", append([]string{"test/e2e/helm.sh"}, args...)...)
	cmd.Dir = repoRoot
	out, err := cmd.CombinedOutput()
	return string(out), err
}

func TestChartLint(t *testing.T) {
	for _, set := range [][]string{
		nil,
		{"--set", "driver.nodeMemoryBudget=8Gi", "--set", "grafanaDashboard.enabled=true",
			"--set", "metrics.serviceMonitor.enabled=true", "--set", "metrics.podMonitor.enabled=true"},
		{"--set", "kubeletDir=/var/snap/microk8s/common/var/lib/kubelet"},
		{"--set", "provisioner.enabled=true", "--set", "driver.nodeMemoryBudget=4Gi"},
		{"--set", "holder.enabled=false", "--set", "hostNetwork=false", "--set", "driver.nodeMemoryBudget="},
		{"--set", "metrics.prometheusRule.enabled=true", "--set", "admissionPolicy.enabled=true",
			"--set", "admissionPolicy.allowedNamespaces={team}", "--set", "admissionPolicy.maxVolumeSize=1Gi",
			"--set", "admissionPolicy.allowedImageRegistries={registry.example.com}",
			"--set", "commonLabels.team=storage", "--set", "driver.nodeMemoryBudget=1.5Gi"},
	} {
		out, err := helm(t, append([]string{"lint", "--strict", chartDir}, set...)...)
		if err != nil {
			t.Errorf("helm lint --strict %s %q: %v\n%s", chartDir, set, err, out)
		}
	}
}

// TestChartRejectsBadValues: values.schema.json turns bad values into an
// error naming the value, before anything is rendered.
func TestChartRejectsBadValues(t *testing.T) {
	for _, tc := range []struct {
		set  string
		want string // in the error
	}{
		{"driverName=Memfs_CSI", "driverName"},
		{"kubeletDir=var/lib/kubelet", "kubeletDir"},
		{"stateDir=", "stateDir"},
		{"driver.nodeMemoryBudget=lots", "nodeMemoryBudget"},
		{"driver.nodeMemoryBudget=1.5.2Gi", "nodeMemoryBudget"},
		{"driver.nodeMemoryBudget=2GB", "nodeMemoryBudget"},
		{"driver.registryCAFile=ca.crt", "registryCAFile"},
		{"driver.maxVolumeInodes=-1", "maxVolumeInodes"},
		{"driver.defaultVolumeSize=64MB", "defaultVolumeSize"},
		{"driver.logLevel=11", "logLevel"},
		{"driver.maxVolumes=-1", "maxVolumes"},
		{"driver.insecureRegistries[0]=http://registry:5000", "insecureRegistries"},
		{"driver.sizeDefault=64Mi", "sizeDefault"},
		// The node-driver-registrar sidecar mode is gone (CHANGELOG.md).
		{"registrar.mode=sidecar", "registrar"},
		{"commonLabels.team=1", "commonLabels"},
		{"daemonSetAnnotations.a=1", "daemonSetAnnotations"},
		{"env[0].value=x", "name"},
		{"extraVolumes[0].configMap.name=ca", "name"},
		{"extraVolumeMounts[0].name=ca", "mountPath"},
		{"extraVolumeMounts[0].mountPath=etc/ca", "mountPath"},
		{"securityContext.sidecar.privileged=true", "sidecar"},
		{"hostNetwork=maybe", "hostNetwork"},
		{"startupProbe.timeoutSeconds=0", "timeoutSeconds"},
		{"metrics.prometheusRule.enabled=yes", "enabled"},
		{"metrics.prometheusRule.rules=x", "rules"},
		{"admissionPolicy.allowedNamespaces[0]=Team_A", "allowedNamespaces"},
		{"admissionPolicy.maxVolumeSize=1GB", "maxVolumeSize"},
		{"admissionPolicy.maxVolumeSizeByNamespace.ml=lots", "ml"},
		{"admissionPolicy.allowedImageRegistries[0]=https://registry.example.com", "allowedImageRegistries"},
		{"admissionPolicy.failurePolicy=Warn", "failurePolicy"},
		{"metrics.port=70000", "port"},
		{"image.digest=latest", "digest"},
		{"image.pullPolicy=Sometimes", "pullPolicy"},
		{"memoryOverhead=256MB", "memoryOverhead"},
		{"memoryOverhead=0.25.1Gi", "memoryOverhead"},
		{"updateStrategy.type=Recreate", "type"},
		{"updateStrategy.rollingUpdate.maxSurge=-1", "maxSurge"},
		{"holder.deadline=-1m", "deadline"},
		{"holder.deadline=2 minutes", "deadline"},
		{"holder.deadline=120", "deadline"},
		{"holder.enabled=yes", "enabled"},
		{"holder.resources.limit.memory=1Gi", "limit"},
		{"startupProbe.failureThreshold=0", "failureThreshold"},
		{"nodeSelectr.disk=ssd", "nodeSelectr"},
	} {
		t.Run(tc.set, func(t *testing.T) {
			out, err := helm(t, "template", "x", chartDir, "--set", tc.set)
			if err == nil {
				t.Fatalf("helm template --set %s rendered; want a schema error", tc.set)
			}
			if !strings.Contains(out, "values don't meet the specifications of the schema") || !strings.Contains(out, tc.want) {
				t.Fatalf("helm template --set %s: want the schema's message naming %q, got:\n%s", tc.set, tc.want, out)
			}
		})
	}
}

// TestChartRendering checks what the values turn into.
func TestChartRendering(t *testing.T) {
	render := func(t *testing.T, args ...string) string {
		t.Helper()
		out, err := helm(t, append([]string{"template", "csi-memfs", chartDir, "--namespace", "csi-memfs"}, args...)...)
		if err != nil {
			t.Fatalf("helm template %q: %v\n%s", args, err, out)
		}
		return out
	}
	has := func(t *testing.T, out string, want ...string) {
		t.Helper()
		for _, w := range want {
			if !strings.Contains(out, w) {
				t.Errorf("rendering lacks %q", w)
			}
		}
	}
	hasNot := func(t *testing.T, out string, unwanted ...string) {
		t.Helper()
		for _, w := range unwanted {
			if strings.Contains(out, w) {
				t.Errorf("rendering has %q", w)
			}
		}
	}

	t.Run("defaults", func(t *testing.T) {
		out := render(t)
		has(t, out,
			"kind: CSIDriver", "attachRequired: false", "podInfoOnMount: true", "- Ephemeral", "fsGroupPolicy: File",
			"kind: DaemonSet", "priorityClassName: system-node-critical", "privileged: true",
			"mountPropagation: Bidirectional", "path: /var/lib/kubelet/pods",
			"- --kubelet-registration-path=/var/lib/kubelet/plugins/memfs.csi.dev/csi.sock",
			"- --registration-dir=/registration", "path: /var/lib/kubelet/plugins_registry",
			"path: /dev/fuse", "path: /healthz", "- --image-cache-dir=/var/cache/csi-memfs", "automountServiceAccountToken: false",
			"clusterIP: None", "maxSurge: 1", "maxUnavailable: 0", "startupProbe:", "timeoutSeconds: 5",
			"hostNetwork: true", "dnsPolicy: ClusterFirstWithHostNet",
			// The metrics port, 9809, as /proc/net/tcp writes it.
			"grep -hE ':2651 ",
			// Safe defaults: every volume and the node bounded.
			"- --max-volume-size=1Gi\n", "- --max-volume-inodes=1000000\n", "- --image-cache-budget=10Gi\n",
			"- --node-memory-budget=2Gi\n", "memory: 2304Mi\n")
		// No container port: on the host network it would become a
		// hostPort, and the scheduler would not place the second pod of
		// a rolling update (maxSurge) on the node.
		hasNot(t, out, "hostPort:", "containerPort:", "port: metrics\n      path")
		// No RBAC: the plugin calls no Kubernetes API.
		hasNot(t, out, "kind: Role", "kind: ClusterRole", "node-driver-registrar", "ServiceMonitor", "PodMonitor",
			"kind: ConfigMap", "memory: \"", "PrometheusRule", "ValidatingAdmissionPolicy", "--registry-ca-file")
	})
	t.Run("holder", func(t *testing.T) {
		out := render(t, "--set", "holder.deadline=90s", "--set", "driver.logLevel=4", "--set", "metrics.port=29809")
		holder := containerSpec(t, out, "holder")
		has(t, holder, "- hold\n", "- --state-dir=/var/lib/csi-memfs\n", "- --deadline=90s\n", "- -v=4\n",
			"privileged: false", "allowPrivilegeEscalation: false", "drop:\n              - ALL\n", "readOnlyRootFilesystem: true",
			"mountPath: /var/lib/csi-memfs\n", "mountPropagation: HostToContainer", "memory: 128Mi")
		// No probe (a restart loses the held connections), no /dev/fuse,
		// and only the state directory.
		hasNot(t, holder, "Probe", "dev-fuse", "mountPropagation: Bidirectional", "plugin-dir", "pods-dir", "image-cache")
		// The holder comes first, so that it listens before the plugin
		// starts; the plugin's state directory is the holder's.
		if h, p := strings.Index(out, "- name: holder"), strings.Index(out, "- name: csi-memfs\n"); h < 0 || p < h {
			t.Errorf("the holder container is not before the plugin's")
		}
		has(t, containerSpec(t, out, "csi-memfs"), "- --state-dir=/var/lib/csi-memfs\n", "grep -hE ':7471 ")
		out = render(t, "--set", "holder.enabled=false")
		hasNot(t, out, "name: holder", "- hold")
	})
	t.Run("budget sets the memory limit", func(t *testing.T) {
		for _, tc := range []struct{ budget, overhead, limit string }{
			{"8Gi", "256Mi", "8448Mi"},
			{"1.5Gi", "256Mi", "1792Mi"},
			// 1.5e9 bytes is 1430.5 MiB, rounded up.
			{"1.5G", "256Mi", "1687Mi"},
			{"512Mi", "0.25Gi", "768Mi"},
			{"1000000k", "100M", "1050Mi"},
		} {
			out := render(t, "--set", "driver.nodeMemoryBudget="+tc.budget, "--set", "memoryOverhead="+tc.overhead)
			has(t, containerSpec(t, out, "csi-memfs"), "- --node-memory-budget="+tc.budget+"\n", "memory: "+tc.limit+"\n")
		}
		out := render(t, "--set", "driver.nodeMemoryBudget=8Gi", "--set", "resources.limits.memory=12Gi")
		has(t, out, "memory: 12Gi")
		out = render(t, "--set", "driver.nodeMemoryBudget=")
		hasNot(t, containerSpec(t, out, "csi-memfs"), "--node-memory-budget", "limits:")
	})
	t.Run("kubeletDir", func(t *testing.T) {
		out := render(t, "--set", "kubeletDir=/var/snap/microk8s/common/var/lib/kubelet/")
		has(t, out, "path: /var/snap/microk8s/common/var/lib/kubelet/pods\n",
			"mountPath: /var/snap/microk8s/common/var/lib/kubelet/pods\n",
			"--kubelet-registration-path=/var/snap/microk8s/common/var/lib/kubelet/plugins/memfs.csi.dev/csi.sock")
	})
	t.Run("operator knobs", func(t *testing.T) {
		out := render(t, "--set", "commonLabels.team=storage", "--set", "daemonSetAnnotations.owner=platform",
			"--set", "podAnnotations.scrape=yes",
			"--set", "env[0].name=HTTPS_PROXY", "--set", "env[0].value=http://proxy:3128",
			"--set", "extraVolumes[0].name=registry-ca", "--set", "extraVolumes[0].configMap.name=registry-ca",
			"--set", "extraVolumeMounts[0].name=registry-ca", "--set", "extraVolumeMounts[0].mountPath=/etc/csi-memfs/registry-ca",
			"--set", "driver.registryCAFile=/etc/csi-memfs/registry-ca/ca.crt",
			"--set", "securityContext.plugin.seccompProfile.type=Unconfined",
			"--set", "securityContext.holder.runAsUser=65534", "--set", "podSecurityContext.fsGroup=2000",
			"--set", "startupProbe.timeoutSeconds=9", "--set", "hostNetwork=false")
		if n := strings.Count(out, "    team: storage\n"); n < 5 {
			t.Errorf("commonLabels on %d objects' metadata, want every object's (5)", n)
		}
		has(t, out, "  annotations:\n    owner: platform\n", "scrape: \"yes\"", "fsGroup: 2000")
		hasNot(t, out, "hostNetwork", "ClusterFirstWithHostNet")
		plugin := containerSpec(t, out, "csi-memfs")
		has(t, plugin, "- name: HTTPS_PROXY\n              value: http://proxy:3128\n",
			"- --registry-ca-file=/etc/csi-memfs/registry-ca/ca.crt\n",
			"- mountPath: /etc/csi-memfs/registry-ca\n              name: registry-ca",
			"privileged: true\n", "seccompProfile:\n              type: Unconfined\n", "timeoutSeconds: 9\n")
		holder := containerSpec(t, out, "holder")
		has(t, holder, "runAsUser: 65534", "privileged: false", "- ALL\n")
		has(t, out, "- configMap:\n            name: registry-ca\n          name: registry-ca\n")
	})
	t.Run("alerts", func(t *testing.T) {
		out := render(t, "--set", "metrics.prometheusRule.enabled=true", "--set", "metrics.prometheusRule.labels.release=prom")
		has(t, out, "kind: PrometheusRule", "release: prom", "alert: CSIMemfsVolumeLost", "alert: CSIMemfsNotRegistered",
			"alert: CSIMemfsNodeBudgetNearlyFull", "alert: CSIMemfsVolumeNearlyFull", "alert: CSIMemfsTakeoverPauseLong")
	})
	t.Run("admission policy", func(t *testing.T) {
		out := render(t, "--set", "admissionPolicy.enabled=true", "--set", "admissionPolicy.allowedNamespaces={team,ml}",
			"--set", "admissionPolicy.allowedNamespaceLabels.memfs=allowed",
			"--set", "admissionPolicy.maxVolumeSize=1Gi", "--set", "admissionPolicy.maxVolumeSizeByNamespace.ml=8Gi",
			"--set", "admissionPolicy.allowedImageRegistries={registry.example.com,127.0.0.1:5000}")
		has(t, out, "kind: ValidatingAdmissionPolicy\n", "kind: ValidatingAdmissionPolicyBinding\n",
			"apiVersion: admissionregistration.k8s.io/v1\n", "validationActions: [Deny]", "failurePolicy: Fail",
			`variables.podNamespace in ["team","ml"] || (has(namespaceObject.metadata.labels) && "memfs" in namespaceObject.metadata.labels`,
			`variables.podNamespace in {"ml":"8Gi"} ?`, `: "1Gi"`,
			`variables.registries.all(r, r in ["registry.example.com","127.0.0.1:5000"])`,
			"allows them in namespaces team, ml and namespaces labelled memfs=allowed")
		out = render(t, "--set", "admissionPolicy.enabled=true")
		has(t, out, "- name: namespaceAllowed\n      expression: >-\n        true\n")
		hasNot(t, out, "variables.registries.all")
		out, err := helm(t, "template", "x", chartDir, "--set", "admissionPolicy.enabled=true", "--kube-version", "1.29.0")
		if err == nil || !strings.Contains(out, "Kubernetes 1.30 or later") {
			t.Errorf("admissionPolicy on Kubernetes 1.29 rendered, or without the reason: %v\n%s", err, out)
		}
	})
	t.Run("provisioner", func(t *testing.T) {
		// Off (the default): no token, no RBAC, no StorageClass; both
		// lifecycle modes all the same (the field is immutable).
		out := render(t)
		has(t, out, "automountServiceAccountToken: false", "storageCapacity: false", "    - Ephemeral\n    - Persistent\n")
		hasNot(t, out, "kind: ClusterRole", "kind: Role\n", "kind: StorageClass", "--provisioner", "POD_NAMESPACE")
		out = render(t, "--set", "provisioner.enabled=true", "--set", "storageClasses[0].name=memory",
			"--set", "storageClasses[0].parameters.noswap=true", "--set", "storageClasses[0].isDefault=true")
		has(t, out, "automountServiceAccountToken: true", "storageCapacity: true", "    - Ephemeral\n", "    - Persistent\n",
			"kind: ClusterRole\n", "kind: ClusterRoleBinding\n", "kind: Role\n", "kind: RoleBinding\n",
			"resources: [persistentvolumes]\n    verbs: [get, list, watch, create, delete]",
			"resources: [persistentvolumeclaims]\n    verbs: [get, list, watch, update]",
			"resources: [csistoragecapacities]\n    verbs: [get, list, create, update, delete]",
			"- --provisioner\n", "- name: POD_NAMESPACE\n", "- name: POD_UID\n",
			"kind: StorageClass\n", "provisioner: memfs.csi.dev\n", "  noswap: \"true\"\n",
			"volumeBindingMode: WaitForFirstConsumer\n", "reclaimPolicy: Delete\n", "allowVolumeExpansion: false\n",
			`storageclass.kubernetes.io/is-default-class: "true"`)
		// Minimal: no leader election, nothing of the DaemonSet.
		hasNot(t, out, "leases", "daemonsets", "resources: [\"*\"]", "verbs: [\"*\"]")
		// The flag goes to the plugin container alone.
		if c := containerSpec(t, out, "csi-memfs"); !strings.Contains(c, "- --provisioner") {
			t.Errorf("the plugin container lacks --provisioner:\n%s", c)
		}
		if _, err := helm(t, "template", "x", chartDir, "--set", "provisioner.enabled=true",
			"--set", "storageClasses[0].parameters.size=1Gi"); err == nil {
			t.Errorf("a StorageClass with a size parameter rendered; want a schema error (the size is the claim's)")
		}
	})
	t.Run("monitoring", func(t *testing.T) {
		out := render(t, "--set", "grafanaDashboard.enabled=true", "--set", "metrics.serviceMonitor.enabled=true",
			"--set", "metrics.podMonitor.enabled=true")
		has(t, out, "kind: ServiceMonitor", "kind: PodMonitor", "kind: ConfigMap", "grafana_dashboard: \"1\"",
			`"uid": "csi-memfs"`,
			// The plugin container has no named port: the PodMonitor
			// keeps its container's target and sets the port.
			"regex: csi-memfs", "replacement: '${1}:9809'", "replacement: '[${1}]:9809'")
	})
	t.Run("driver flags", func(t *testing.T) {
		out := render(t, "--set", "driver.maxVolumeSize=1Gi", "--set", "driver.maxVolumes=100",
			"--set", "driver.passthrough=false", "--set", "driver.logLevel=4",
			"--set", "driver.insecureRegistries={127.0.0.1:5000,registry.local}",
			"--set", "driver.imageCacheBudget=20Gi")
		has(t, out, "- --max-volume-size=1Gi", "- --max-volumes=100", "- --no-passthrough", "- -v=4",
			"- --insecure-registry=127.0.0.1:5000", "- --insecure-registry=registry.local", "- --image-cache-budget=20Gi")
	})
}

// containerSpec returns the part of the rendering that describes the
// container named name: from its "- name:" line to the next container or
// the pod's volumes.
func containerSpec(t *testing.T, out, name string) string {
	t.Helper()
	i := strings.Index(out, "\n        - name: "+name+"\n")
	if i < 0 {
		t.Fatalf("rendering has no container %s", name)
	}
	rest := out[i+1:]
	end := len(rest)
	for _, stop := range []string{"\n        - name: ", "\n      volumes:"} {
		if j := strings.Index(rest[1:], stop); j >= 0 && j+1 < end {
			end = j + 1
		}
	}
	return rest[:end]
}

// TestDeployUpToDate: deploy/csi-memfs.yaml is the chart rendered with its
// default values.
func TestDeployUpToDate(t *testing.T) {
	if testing.Short() {
		t.Skip("needs helm; skipped with -short")
	}
	cmd := exec.Command("bash", "hack/render-deploy.sh", "-")
	cmd.Dir = repoRoot
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	fresh, err := cmd.Output()
	if err != nil {
		t.Fatalf("bash hack/render-deploy.sh -: %v\n%s", err, stderr.String())
	}
	have, err := os.ReadFile(filepath.Join(repoRoot, "deploy", "csi-memfs.yaml"))
	if err != nil {
		t.Fatalf("%v\nGenerate it with: bash hack/render-deploy.sh", err)
	}
	if !bytes.Equal(have, fresh) {
		t.Fatalf("deploy/csi-memfs.yaml differs from the chart's rendering (first difference: %s)\n"+
			"Regenerate it with: bash hack/render-deploy.sh", firstDiff(string(have), string(fresh)))
	}
}

// firstDiff describes the first line where a and b differ.
func firstDiff(a, b string) string {
	al, bl := strings.Split(a, "\n"), strings.Split(b, "\n")
	for i := 0; i < len(al) || i < len(bl); i++ {
		var x, y string
		if i < len(al) {
			x = al[i]
		}
		if i < len(bl) {
			y = bl[i]
		}
		if x != y {
			return fmt.Sprintf("line %d: deploy/ has %q, the chart renders %q", i+1, x, y)
		}
	}
	return "none"
}

// standardSeries are the client_golang Go and process collectors' series the
// dashboard may use.
var standardSeries = []string{
	"process_resident_memory_bytes", "process_cpu_seconds_total", "process_open_fds",
	"process_virtual_memory_bytes", "process_start_time_seconds",
	"go_goroutines", "go_memstats_heap_inuse_bytes", "go_memstats_alloc_bytes", "go_gc_duration_seconds",
}

// dashboardSeries returns the metric names the dashboard's queries name,
// sorted and unique.
func dashboardSeries(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(repoRoot, chartDir, "dashboards", "csi-memfs.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash any
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatalf("dashboard JSON: %v", err)
	}
	var exprs []string
	var walk func(v any, key string)
	walk = func(v any, key string) {
		switch v := v.(type) {
		case map[string]any:
			for k, x := range v {
				walk(x, k)
			}
		case []any:
			for _, x := range v {
				walk(x, key)
			}
		case string:
			if key == "expr" || key == "query" || key == "definition" {
				exprs = append(exprs, v)
			}
		}
	}
	walk(dash, "")
	if len(exprs) < 10 {
		t.Fatalf("found %d queries in the dashboard; the walk is broken", len(exprs))
	}
	name := regexp.MustCompile(`\b(csi_memfs_[a-z0-9_]+|process_[a-z0-9_]+|go_[a-z0-9_]+)\b`)
	seen := map[string]bool{}
	for _, e := range exprs {
		for _, m := range name.FindAllString(e, -1) {
			seen[m] = true
		}
	}
	var names []string
	for n := range seen {
		names = append(names, n)
	}
	sort.Strings(names)
	return names
}

// driverMetricNames returns the csi_memfs_ names the driver registers: the
// string literals its non-test sources join to metricsPrefix or hand to the
// Desc constructors (vol, node), prefixed.
func driverMetricNames(t *testing.T) (names map[string]bool, histograms map[string]bool) {
	t.Helper()
	fset := token.NewFileSet()
	pkgs, err := parser.ParseDir(fset, filepath.Join(repoRoot, "driver"), func(fi os.FileInfo) bool {
		return !strings.HasSuffix(fi.Name(), "_test.go")
	}, 0)
	if err != nil {
		t.Fatal(err)
	}
	names, histograms = map[string]bool{}, map[string]bool{}
	var prefix string
	lit := func(e ast.Expr) (string, bool) {
		if b, ok := e.(*ast.BasicLit); ok && b.Kind == token.STRING {
			s, err := strconv.Unquote(b.Value)
			return s, err == nil
		}
		return "", false
	}
	for _, p := range pkgs {
		for _, f := range p.Files {
			ast.Inspect(f, func(n ast.Node) bool {
				if vs, ok := n.(*ast.ValueSpec); ok && len(vs.Names) == 1 && vs.Names[0].Name == "metricsPrefix" && len(vs.Values) == 1 {
					prefix, _ = lit(vs.Values[0])
				}
				return true
			})
		}
	}
	if prefix != "csi_memfs_" {
		t.Fatalf("driver's metricsPrefix = %q, want csi_memfs_", prefix)
	}
	for _, p := range pkgs {
		for _, f := range p.Files {
			ast.Inspect(f, func(n ast.Node) bool {
				switch n := n.(type) {
				case *ast.BinaryExpr:
					if id, ok := n.X.(*ast.Ident); ok && id.Name == "metricsPrefix" && n.Op == token.ADD {
						if s, ok := lit(n.Y); ok {
							names[prefix+s] = true
						}
					}
				case *ast.CallExpr:
					if id, ok := n.Fun.(*ast.Ident); ok && (id.Name == "vol" || id.Name == "node") && len(n.Args) > 0 {
						if s, ok := lit(n.Args[0]); ok {
							names[prefix+s] = true
						}
					}
					// prometheus.HistogramOpts{Name: metricsPrefix + "..."}
				case *ast.CompositeLit:
					if sel, ok := n.Type.(*ast.SelectorExpr); ok && sel.Sel.Name == "HistogramOpts" {
						for _, el := range n.Elts {
							kv, ok := el.(*ast.KeyValueExpr)
							if !ok || fmt.Sprint(kv.Key) != "Name" {
								continue
							}
							if b, ok := kv.Value.(*ast.BinaryExpr); ok {
								if s, ok := lit(b.Y); ok {
									histograms[prefix+s] = true
								}
							}
						}
					}
				}
				return true
			})
		}
	}
	if len(names) < 10 {
		t.Fatalf("found only %d metric names in driver/: the source scan is broken: %v", len(names), names)
	}
	return names, histograms
}

// documentedMetrics returns the metric names of the metrics tables in the
// documentation (README.md and docs/*.md; rows starting "| `csi_memfs_").
func documentedMetrics(t *testing.T) map[string]bool {
	t.Helper()
	files, _ := filepath.Glob(filepath.Join(repoRoot, "docs", "*.md"))
	files = append(files, filepath.Join(repoRoot, "README.md"))
	doc := map[string]bool{}
	row := regexp.MustCompile("(?m)^\\| `(csi_memfs_[a-z0-9_]+)")
	for _, f := range files {
		b, err := os.ReadFile(f)
		if err != nil {
			continue
		}
		for _, m := range row.FindAllStringSubmatch(string(b), -1) {
			doc[m[1]] = true
		}
	}
	if len(doc) < 10 {
		t.Fatalf("found only %d metrics in the documentation's metrics tables (README.md, docs/*.md)", len(doc))
	}
	return doc
}

// TestDashboardSeriesExist: every series a dashboard query names is one the
// driver registers and the documentation's metrics table lists (a
// histogram's _bucket, _sum and _count count as the histogram), or a
// standard Go or process series.
func TestDashboardSeriesExist(t *testing.T) {
	registered, histograms := driverMetricNames(t)
	documented := documentedMetrics(t)
	used := dashboardSeries(t)
	for _, n := range used {
		if strings.HasPrefix(n, "go_") || strings.HasPrefix(n, "process_") {
			if !slices.Contains(standardSeries, n) {
				t.Errorf("dashboard names %s, which is not a standard Go or process series", n)
			}
			continue
		}
		base := n
		for _, suf := range []string{"_bucket", "_sum", "_count"} {
			if b, ok := strings.CutSuffix(n, suf); ok && histograms[b] {
				base = b
			}
		}
		if !registered[base] {
			t.Errorf("dashboard names %s, which the driver does not register (driver/metrics.go)", n)
		}
		if !documented[base] {
			t.Errorf("dashboard names %s, which no metrics table in README.md or docs/ documents", n)
		}
	}
	t.Logf("dashboard series: %v", used)
}

// TestDashboardCoversNodeAndVolumes: the panels the issue asks for exist.
func TestDashboardCoversNodeAndVolumes(t *testing.T) {
	used := dashboardSeries(t)
	for _, want := range []string{
		"csi_memfs_volume_used_bytes", "csi_memfs_volume_limit_bytes", // per-volume usage against limit
		"csi_memfs_node_used_bytes", "csi_memfs_node_budget_bytes", // node memory against budget
		"csi_memfs_csi_operation_duration_seconds_bucket", "csi_memfs_csi_operations_total", // publish latency and errors
		"csi_memfs_fuse_operation_duration_seconds_count", "csi_memfs_fuse_operation_duration_seconds_bucket", // FUSE rates, latencies
		"csi_memfs_image_pulls_total", "csi_memfs_image_cache_bytes", // image pulls and cache size
		"csi_memfs_takeovers_total", "csi_memfs_handovers_total", // restarts
		"csi_memfs_volumes_lost_total", "csi_memfs_volume_lost", "csi_memfs_volumes_recovered_total",
		"csi_memfs_takeover_pause_seconds_bucket",
	} {
		if !slices.Contains(used, want) {
			t.Errorf("the dashboard has no query of %s", want)
		}
	}
}

// TestDashboardUnitsAndNode: every panel has one unit (a table's count
// columns may say so), the dashboard is templated on the node label the
// chart's ServiceMonitor and PodMonitor set, and every query filters by it.
func TestDashboardUnitsAndNode(t *testing.T) {
	b, err := os.ReadFile(filepath.Join(repoRoot, chartDir, "dashboards", "csi-memfs.json"))
	if err != nil {
		t.Fatal(err)
	}
	var dash struct {
		Panels []struct {
			Title, Type string
			FieldConfig struct {
				Defaults  struct{ Unit string }
				Overrides []struct {
					Properties []struct {
						ID    string
						Value any
					}
				}
			}
			Targets []struct{ Expr string }
		}
		Templating struct {
			List []struct{ Name, Definition string }
		}
	}
	if err := json.Unmarshal(b, &dash); err != nil {
		t.Fatal(err)
	}
	var node bool
	for _, v := range dash.Templating.List {
		node = node || (v.Name == "node" && strings.Contains(v.Definition, ", node)"))
	}
	if !node {
		t.Errorf("the dashboard has no node variable over the node label")
	}
	for _, p := range dash.Panels {
		if p.Type == "row" {
			continue
		}
		if p.FieldConfig.Defaults.Unit == "" {
			t.Errorf("panel %q has no unit", p.Title)
		}
		for _, o := range p.FieldConfig.Overrides {
			for _, pr := range o.Properties {
				if pr.ID == "unit" && (p.Type != "table" || pr.Value != "short") {
					t.Errorf("panel %q overrides its unit with %v: one unit per panel", p.Title, pr.Value)
				}
			}
		}
		for _, tg := range p.Targets {
			if !strings.Contains(tg.Expr, `node=~"$node"`) {
				t.Errorf("panel %q: query %s does not filter by $node", p.Title, tg.Expr)
			}
		}
	}
}
