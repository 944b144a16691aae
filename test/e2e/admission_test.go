//go:build e2e

package e2e

import (
	"bytes"
	"strings"
	"testing"
	"time"
)

// TestAdmissionPolicy: with admissionPolicy.enabled the apiserver refuses,
// with the policy's message, pods whose csi-memfs volumes are in a
// namespace not allowed, larger than allowed, or from a registry not
// allowed; a pod within the policy runs.
func TestAdmissionPolicy(t *testing.T) {
	requireCluster(t)
	const denied = "e2e-denied"
	// The policy's objects only: the DaemonSet's template does not change,
	// so no plugin pod restarts.
	upgrade := func(set ...string) {
		t.Helper()
		args := append([]string{"upgrade", "csi-memfs", "charts/csi-memfs", "--namespace", pluginNS, "--reuse-values"}, set...)
		if out, err := helmCmd(append(args, "--wait", "--timeout", "2m")...); err != nil {
			t.Fatalf("helm %s: %v\n%s", strings.Join(args, " "), err, out)
		}
	}
	upgrade("--set", "admissionPolicy.enabled=true",
		"--set", "admissionPolicy.allowedNamespaces={"+testNS+"}",
		"--set", "admissionPolicy.maxVolumeSize=64Mi",
		"--set", "admissionPolicy.allowedImageRegistries={registry.example.com}")
	t.Cleanup(func() {
		kubectl("delete", "namespace", denied, "--ignore-not-found", "--timeout=2m")
		upgrade("--set", "admissionPolicy.enabled=false")
	})
	if out, err := kubectl("get", "validatingadmissionpolicies", "-o", "name"); err != nil || !strings.Contains(out, driverName) {
		t.Fatalf("no ValidatingAdmissionPolicy after the upgrade: %v\n%s", err, out)
	}
	if out, err := kubectl("create", "namespace", denied); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if err := poll(time.Minute, func() (bool, error) {
		_, err := kubectl("-n", denied, "get", "serviceaccount", "default")
		return err == nil, nil
	}); err != nil {
		t.Fatalf("no default service account in %s", denied)
	}

	// manifest is p's pod manifest, in namespace ns.
	manifest := func(p pod, ns string) *bytes.Buffer {
		p.Command = "sleep 3600"
		var b bytes.Buffer
		if err := podTemplate.Execute(&b, p); err != nil {
			t.Fatal(err)
		}
		return bytes.NewBufferString(strings.Replace(b.String(), "namespace: "+testNS+"\n", "namespace: "+ns+"\n", 1))
	}
	// refused creates p in ns until the apiserver refuses it (the policy
	// takes effect within seconds of its creation) and returns the error.
	refused := func(p pod, ns string) string {
		t.Helper()
		var msg string
		err := poll(time.Minute, func() (bool, error) {
			out, err := kubectlIn(manifest(p, ns), "create", "-f", "-")
			if err != nil {
				msg = out
				return true, nil
			}
			// Admitted before the policy was in force: try again.
			kubectl("-n", ns, "delete", "pod", p.Name, "--wait=true", "--timeout=1m")
			return false, nil
		})
		if err != nil {
			t.Fatalf("pod %s/%s was admitted for a minute; want the admission policy to refuse it", ns, p.Name)
		}
		return msg
	}

	for _, tc := range []struct {
		name, ns string
		p        pod
		want     []string
	}{
		{"namespace not allowed", denied, pod{Name: "policy-ns", Attrs: map[string]string{"size": "8Mi"}},
			[]string{"ValidatingAdmissionPolicy", "denied request", "csi-memfs: pods in namespace " + denied + " may not use " + driverName + " volumes", "namespaces " + testNS}},
		{"size above the maximum", testNS, pod{Name: "policy-size", Attrs: map[string]string{"size": "128Mi"}},
			[]string{"csi-memfs: a " + driverName + " volume size above 64Mi is not allowed in namespace " + testNS}},
		{"registry not allowed", testNS, pod{Name: "policy-registry", Attrs: map[string]string{"size": "8Mi", "image": "evil.example.org/x:1"}},
			[]string{"csi-memfs: " + driverName + " image volumes may only pull from registry.example.com; this pod names evil.example.org"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			msg := refused(tc.p, tc.ns)
			for _, w := range tc.want {
				if !strings.Contains(msg, w) {
					t.Errorf("refusal of pod %s/%s lacks %q:\n%s", tc.ns, tc.p.Name, w, msg)
				}
			}
		})
	}

	// Within the policy: an allowed namespace, a size at most the maximum.
	runPod(t, pod{Name: "policy-ok", Attrs: map[string]string{"size": "64Mi"}})
	mustExec(t, "policy-ok", "echo ok >/data/ok && cat /data/ok")
	// Pods without csi-memfs volumes are not the policy's business.
	if out, err := kubectlIn(bytes.NewBufferString(`apiVersion: v1
kind: Pod
metadata:
  name: policy-plain
  namespace: `+denied+`
spec:
  containers:
    - name: app
      image: `+workload+`
      imagePullPolicy: Never
      command: ["sleep", "3600"]
`), "create", "--dry-run=server", "-f", "-"); err != nil {
		t.Errorf("a pod without csi-memfs volumes in %s was refused: %v\n%s", denied, err, out)
	}
}
