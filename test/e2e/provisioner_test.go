//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"regexp"
	"strings"
	"testing"
	"time"
)

// provisionerValues are the `helm upgrade --reuse-values` arguments that
// turn the provisioner on in the e2e cluster. The cluster runs no
// kube-proxy, so the kubernetes Service address every pod is given
// (KUBERNETES_SERVICE_HOST, 10.96.0.1) leads nowhere in it; the plugin
// pod, on the host network, reaches the API server where it listens,
// 127.0.0.1:6443 (its certificate names 127.0.0.1).
var provisionerValues = []string{"--set", "provisioner.enabled=true", "--set-json",
	`env=[{"name":"KUBERNETES_SERVICE_HOST","value":"127.0.0.1"},{"name":"KUBERNETES_SERVICE_PORT","value":"6443"}]`}

// provisionerOffValues undo provisionerValues.
var provisionerOffValues = []string{"--set", "provisioner.enabled=false", "--set-json", "env=[]"}

// ephemeralPod is a pod with a generic ephemeral volume of the chart's
// StorageClass memory, of the given size.
func ephemeralPod(name, size string) *bytes.Buffer {
	return bytes.NewBufferString(fmt.Sprintf(`apiVersion: v1
kind: Pod
metadata:
  name: %s
  namespace: %s
spec:
  automountServiceAccountToken: false
  terminationGracePeriodSeconds: 1
  containers:
    - name: app
      image: %s
      imagePullPolicy: Never
      command: ["sh", "-c", "sleep 3600"]
      volumeMounts:
        - name: data
          mountPath: /data
  volumes:
    - name: data
      ephemeral:
        volumeClaimTemplate:
          spec:
            accessModes: [ReadWriteOnce]
            storageClassName: memory
            resources:
              requests:
                storage: %s
`, name, testNS, workload, size))
}

// createEphemeralPod creates the pod and deletes it when the test ends.
func createEphemeralPod(t *testing.T, name, size string) {
	t.Helper()
	if out, err := kubectlIn(ephemeralPod(name, size), "apply", "-f", "-"); err != nil {
		t.Fatalf("creating pod %s: %v\n%s", name, err, out)
	}
	t.Cleanup(func() { deletePod(t, name) })
}

// nodeCapacity returns the capacity the node's CSIStorageCapacity for the
// class memory says ("" while there is none).
func nodeCapacity() (string, error) {
	out, err := kubectl("-n", pluginNS, "get", "csistoragecapacities", "-l", "memfs.csi.dev/node="+cl.nodeName,
		"-o", `jsonpath={range .items[?(@.storageClassName=="memory")]}{.capacity}{"\n"}{end}`)
	if err != nil {
		return "", fmt.Errorf("%v: %s", err, out)
	}
	out = strings.TrimSpace(out)
	if strings.Contains(out, "\n") {
		return "", fmt.Errorf("more than one CSIStorageCapacity of class memory for the node: %q", out)
	}
	return out, nil
}

// waitCapacity waits for the node's capacity for the class memory to be
// want MiB (the plugin writes it as a binary quantity).
func waitCapacity(t *testing.T, want int64) {
	t.Helper()
	var got string
	if err := poll(2*time.Minute, func() (bool, error) {
		var err error
		got, err = nodeCapacity()
		return got == fmt.Sprintf("%dMi", want), err
	}); err != nil {
		dumpProvisioner()
		t.Fatalf("node capacity for class memory = %q, want %dMi: %v", got, want, err)
	}
}

// dumpProvisioner prints what the provisioner works on and what it made,
// and the plugin's state and logs.
func dumpProvisioner() {
	for _, args := range [][]string{
		{"-n", pluginNS, "get", "csistoragecapacities", "-o", "yaml"},
		{"get", "csidriver", driverName, "-o", "yaml"},
		{"get", "pvc,pv", "-A", "-o", "wide"},
		{"-n", testNS, "get", "events"},
	} {
		out, _ := kubectl(args...)
		fmt.Printf("kubectl %s:\n%s\n", strings.Join(args, " "), out)
	}
	dumpPlugin()
}

// TestGenericEphemeralVolume: with provisioner.enabled, the node publishes
// the memory left in its budget for the StorageClass memory; a pod with a
// generic ephemeral volume of the class runs and writes to it, and takes
// its size from the published capacity; a pod whose volume fits no node's
// budget stays Pending with the scheduler's capacity reason; a
// ResourceQuota on the class refuses a claim over it; deleting the pod
// gives the capacity back and deletes the PersistentVolume.
func TestGenericEphemeralVolume(t *testing.T) {
	requireCluster(t)
	// The DaemonSet's template changes: the plugin pod is replaced (its
	// volumes handed over), and back at the end.
	upgrade := func(set ...string) {
		t.Helper()
		args := append([]string{"upgrade", "csi-memfs", "charts/csi-memfs", "--namespace", pluginNS, "--reuse-values"}, set...)
		if out, err := helmCmd(append(args, "--wait", "--timeout", "4m")...); err != nil {
			t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
		if err := waitRegistered(); err != nil {
			t.Fatalf("plugin not registered after the upgrade: %v", err)
		}
	}
	start := time.Now()
	upgrade(provisionerValues...)
	t.Cleanup(func() { upgrade(provisionerOffValues...) })

	// The node's capacity for the class: the whole budget.
	waitCapacity(t, nodeBudget>>20)
	t.Logf("capacity published %s after the upgrade began", time.Since(start).Round(time.Second))

	// 1. A pod with a generic ephemeral volume runs and writes to it.
	created := time.Now()
	createEphemeralPod(t, "gev-ok", "32Mi")
	waitRunning(t, "gev-ok")
	t.Logf("gev-ok running %s after it was created", time.Since(created).Round(time.Second))
	// kubectl's own messages may come first (combined output).
	if out := mustExec(t, "gev-ok", "echo ok >/data/ok && cat /data/ok && df -k /data | tail -1"); !regexp.MustCompile(`(?m)^ok$`).MatchString(out) ||
		!regexp.MustCompile(`\s32768\s`).MatchString(out) {
		t.Errorf("write to the generic ephemeral volume, and its size: %q, want ok and 32768 KiB", out)
	}
	pvName, err := kubectl("-n", testNS, "get", "pvc", "gev-ok-data", "-o", "jsonpath={.spec.volumeName}")
	if err != nil || pvName == "" {
		t.Fatalf("the claim gev-ok-data is not bound: %v %s", err, pvName)
	}
	if out, err := kubectl("get", "pv", pvName, "-o", "jsonpath={.spec.csi.driver} {.spec.csi.volumeAttributes.memfs\\.csi\\.dev/provisioned} {.spec.capacity.storage}"); err != nil ||
		out != driverName+" true 32Mi" {
		t.Errorf("PV %s = %q (%v), want a %s volume marked provisioned of 32Mi", pvName, out, err, driverName)
	}
	// Its memory is taken from the budget the node publishes.
	waitCapacity(t, nodeBudget>>20-32)

	// 3. The budget has 480Mi left, so no 1Gi volume: the scheduler, which
	// reads the CSIStorageCapacity, selects no node and the pod stays
	// Pending unscheduled (not ContainerCreating on a node that refuses
	// the volume with ResourceExhausted).
	// The reason is read from the pod's PodScheduled condition, which
	// says the last attempt's: not from its events, since the scheduler's
	// event recorder folds every later FailedScheduling of the pod into
	// the first one's series, message and all, and the first attempt may
	// come before the ephemeral volume controller made the claim
	// ("waiting for ephemeral volume controller to create the
	// persistentvolumeclaim").
	createEphemeralPod(t, "gev-huge", "1Gi")
	var cond string
	if err := poll(2*time.Minute, func() (bool, error) {
		var err error
		cond, err = kubectl("-n", testNS, "get", "pod", "gev-huge",
			"-o", `jsonpath={.status.conditions[?(@.type=="PodScheduled")].reason}: {.status.conditions[?(@.type=="PodScheduled")].message}`)
		return err == nil && strings.HasPrefix(cond, "Unschedulable: ") && strings.Contains(cond, "did not have enough free storage"), nil
	}); err != nil {
		dumpProvisioner()
		t.Fatalf("pod gev-huge: PodScheduled condition %q, want Unschedulable for want of storage; events:\n%s", cond, podEvents("gev-huge"))
	}
	t.Logf("gev-huge: %s", cond)
	if out, _ := kubectl("-n", testNS, "get", "pod", "gev-huge", "-o", "jsonpath={.status.phase}/{.spec.nodeName}"); out != "Pending/" {
		t.Errorf("pod gev-huge is %q (phase/node), want Pending and on no node", out)
	}
	if ev := podEvents("gev-huge"); strings.Contains(ev, "ResourceExhausted") {
		t.Errorf("pod gev-huge reached a node that refused its volume:\n%s", ev)
	}
	deletePod(t, "gev-huge")
	// Its claim goes with it (garbage collection); a quota would count it.
	if err := poll(time.Minute, func() (bool, error) {
		out, err := kubectl("-n", testNS, "get", "pvc", "gev-huge-data", "--ignore-not-found", "-o", "name")
		return err == nil && out == "", nil
	}); err != nil {
		t.Fatalf("the claim of the deleted pod gev-huge stays: %v", err)
	}

	// 2. A ResourceQuota on the class: 48Mi of claims, 32Mi used by
	// gev-ok; a 32Mi claim is forbidden, so the pod's claim is never
	// made.
	quota := `apiVersion: v1
kind: ResourceQuota
metadata:
  name: memory-class
  namespace: ` + testNS + `
spec:
  hard:
    memory.storageclass.storage.k8s.io/requests.storage: 48Mi
    memory.storageclass.storage.k8s.io/persistentvolumeclaims: "2"
`
	if out, err := kubectlIn(strings.NewReader(quota), "apply", "-f", "-"); err != nil {
		t.Fatalf("creating the ResourceQuota: %v\n%s", err, out)
	}
	t.Cleanup(func() {
		if out, err := kubectl("-n", testNS, "delete", "resourcequota", "memory-class", "--ignore-not-found"); err != nil {
			t.Errorf("deleting the ResourceQuota: %v\n%s", err, out)
		}
	})
	// The quota admits claims once its usage is known.
	if err := poll(time.Minute, func() (bool, error) {
		out, err := kubectl("-n", testNS, "get", "resourcequota", "memory-class",
			"-o", "jsonpath={.status.used.memory\\.storageclass\\.storage\\.k8s\\.io/requests\\.storage}")
		return err == nil && out == "32Mi", nil
	}); err != nil {
		out, _ := kubectl("-n", testNS, "get", "resourcequota", "memory-class", "-o", "yaml")
		t.Fatalf("the ResourceQuota does not count gev-ok's 32Mi claim: %v\n%s", err, out)
	}
	createEphemeralPod(t, "gev-quota", "32Mi")
	ev := waitEvent(t, "gev-quota", regexp.MustCompile(`FailedBinding[^\n]*forbidden: exceeded quota: memory-class[^\n]*`))
	t.Logf("gev-quota: %s", ev)
	if !strings.Contains(ev, "memory.storageclass.storage.k8s.io/requests.storage=32Mi") {
		t.Errorf("the quota event does not name the class's storage request: %q", ev)
	}
	if out, _ := kubectl("-n", testNS, "get", "pvc", "gev-quota-data", "--ignore-not-found", "-o", "name"); out != "" {
		t.Errorf("a claim over the quota was made: %s", out)
	}
	if out, _ := kubectl("-n", testNS, "get", "pod", "gev-quota", "-o", "jsonpath={.status.phase}/{.spec.nodeName}"); out != "Pending/" {
		t.Errorf("pod gev-quota is %q (phase/node), want Pending and on no node", out)
	}
	deletePod(t, "gev-quota")

	// 4. Deleting the pod gives its memory back to the budget the node
	// publishes, and deletes the PersistentVolume.
	deleted := time.Now()
	deletePod(t, "gev-ok")
	waitCapacity(t, nodeBudget>>20)
	t.Logf("capacity back %s after the deletion began", time.Since(deleted).Round(time.Second))
	if err := poll(2*time.Minute, func() (bool, error) {
		out, err := kubectl("get", "pv", pvName, "--ignore-not-found", "-o", "name")
		return err == nil && out == "", nil
	}); err != nil {
		dumpProvisioner()
		t.Errorf("PV %s of the deleted pod stays: %v", pvName, err)
	}
}
