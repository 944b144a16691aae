//go:build e2e

package e2e

import (
	"bytes"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"
	"time"
)

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

// TestGenericEphemeralVolume: with provisioner.enabled, a pod with a
// generic ephemeral volume of the memory StorageClass runs and writes to
// it, the node publishes its capacity, and a pod whose volume fits no
// node's budget stays Pending with the scheduler's capacity reason.
func TestGenericEphemeralVolume(t *testing.T) {
	requireCluster(t)
	// Experimental: on the e2e cluster the node's CSIStorageCapacity
	// object did not appear within two minutes of enabling the
	// provisioner, so this test runs only when asked for until that is
	// found (issue 16).
	if os.Getenv("E2E_PROVISIONER") != "1" {
		t.Skip("the provisioner is experimental; E2E_PROVISIONER=1 runs this test")
	}
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
	upgrade("--set", "provisioner.enabled=true")
	t.Cleanup(func() { upgrade("--set", "provisioner.enabled=false") })

	// The node's capacity for the class: the budget, nothing published.
	var capacity string
	if err := poll(2*time.Minute, func() (bool, error) {
		out, err := kubectl("-n", pluginNS, "get", "csistoragecapacities",
			"-o", "jsonpath={range .items[*]}{.storageClassName}={.capacity}{\"\\n\"}{end}")
		capacity = out
		return err == nil && strings.Contains(out, "memory="), nil
	}); err != nil {
		dumpPlugin()
		t.Fatalf("no CSIStorageCapacity for class memory: %q", capacity)
	}
	t.Logf("capacity: %s", capacity)

	for name, in := range map[string]*bytes.Buffer{"gev-ok": ephemeralPod("gev-ok", "32Mi"), "gev-huge": ephemeralPod("gev-huge", "1Gi")} {
		if out, err := kubectlIn(in, "apply", "-f", "-"); err != nil {
			t.Fatalf("creating pod %s: %v\n%s", name, err, out)
		}
		t.Cleanup(func() { deletePod(t, name) })
	}
	waitRunning(t, "gev-ok")
	if out := mustExec(t, "gev-ok", "echo ok >/data/ok && cat /data/ok && df -k /data | tail -1"); !strings.Contains(out, "ok") {
		t.Errorf("write to the generic ephemeral volume: %q", out)
	}
	if out, err := kubectl("get", "pv", "-o", "jsonpath={range .items[*]}{.spec.csi.driver} {.spec.csi.volumeAttributes.memfs\\.csi\\.dev/provisioned}{\"\\n\"}{end}"); err != nil ||
		!strings.Contains(out, driverName+" true") {
		t.Errorf("no PV of %s marked provisioned: %v\n%s", driverName, err, out)
	}
	// The budget (512Mi) holds no 1Gi volume: the scheduler, reading the
	// CSIStorageCapacity, selects no node.
	waitEvent(t, "gev-huge", regexp.MustCompile(`FailedScheduling[^\n]*(did not have enough free storage|insufficient capacity)[^\n]*`))
	if out, _ := kubectl("-n", testNS, "get", "pod", "gev-huge", "-o", "jsonpath={.status.phase}"); out != "Pending" {
		t.Errorf("pod gev-huge is %q, want Pending", out)
	}
}
