package driver

import (
	"bytes"
	"context"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr/funcr"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"k8s.io/klog/v2"
)

// TestInterceptorLogsNoSecrets checks that the request log at V(4) strips
// the publish secrets and kubelet's service account tokens, names the
// method, and that the call is counted in the metrics.
func TestInterceptorLogsNoSecrets(t *testing.T) {
	var buf bytes.Buffer
	logger := funcr.New(func(prefix, args string) { buf.WriteString(prefix + args + "\n") }, funcr.Options{Verbosity: 4})
	ctx := klog.NewContext(context.Background(), logger)
	d := &Driver{vols: newRegistry(), budget: &budget{}}
	d.metrics = newMetrics(d.vols.samples, d.budget, false)

	req := pubReq("vol-1", "/target", attrs(attrTokens, `{"aud":{"token":"TOKEN-VALUE"}}`))
	req.Secrets = map[string]string{".dockerconfigjson": "SECRET-VALUE"}
	var seen *csi.NodePublishVolumeRequest
	handler := func(ctx context.Context, r any) (any, error) {
		seen = r.(*csi.NodePublishVolumeRequest)
		klog.FromContext(ctx).Info("In handler")
		return nil, status.Error(codes.Unimplemented, "no")
	}
	info := &grpc.UnaryServerInfo{FullMethod: "/csi.v1.Node/NodePublishVolume"}
	if _, err := d.interceptor(ctx, req, info, handler); status.Code(err) != codes.Unimplemented {
		t.Fatalf("err = %v", err)
	}
	out := buf.String()
	for _, secret := range []string{"SECRET-VALUE", "TOKEN-VALUE"} {
		if strings.Contains(out, secret) {
			t.Errorf("log shows %s:\n%s", secret, out)
		}
	}
	for _, want := range []string{`"method"="NodePublishVolume"`, `"msg"="Request"`, `"msg"="Response"`, `"code"="Unimplemented"`, "vol-1", "In handler"} {
		if !strings.Contains(out, want) {
			t.Errorf("log lacks %s:\n%s", want, out)
		}
	}
	// The handler sees the request unchanged.
	if seen.Secrets[".dockerconfigjson"] != "SECRET-VALUE" || !strings.Contains(seen.VolumeContext[attrTokens], "TOKEN-VALUE") {
		t.Errorf("the handler got a changed request: %v", seen)
	}
	mfs, err := d.metrics.reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, mf := range mfs {
		if mf.GetName() == "csi_memfs_csi_operations_total" {
			for _, m := range mf.GetMetric() {
				found = found || (m.GetCounter().GetValue() == 1 && strings.Contains(m.String(), "Unimplemented"))
			}
		}
	}
	if !found {
		t.Errorf("csi_memfs_csi_operations_total{method=NodePublishVolume,code=Unimplemented} is not 1")
	}
}

// TestRefusedPublishLogsPod: a publish refused by its first checks (the
// target path, an unknown attribute) is logged with the pod kubelet named.
func TestRefusedPublishLogsPod(t *testing.T) {
	cfg, err := Config{NodeID: "n", StateDir: "/nonexistent"}.withDefaults()
	if err != nil {
		t.Fatal(err)
	}
	d := &Driver{cfg: cfg}
	pod := attrs(attrPodNS, "team", attrPodName, "web-0")
	bad := attrs(attrPodNS, "team", attrPodName, "web-0", "colour", "blue")
	for name, req := range map[string]*csi.NodePublishVolumeRequest{
		"relative target":   pubReq("vol-1", "relative/target", pod),
		"unknown attribute": pubReq("vol-1", "/var/lib/kubelet/pods/uid/volumes/kubernetes.io~csi/data/mount", bad),
	} {
		var buf bytes.Buffer
		logger := funcr.New(func(prefix, args string) { buf.WriteString(prefix + args + "\n") }, funcr.Options{Verbosity: 2})
		_, err := d.NodePublishVolume(klog.NewContext(context.Background(), logger), req)
		if status.Code(err) != codes.InvalidArgument {
			t.Fatalf("%s: err = %v, want InvalidArgument", name, err)
		}
		for _, want := range []string{`"msg"="Publish refused"`, `"volumeID"="vol-1"`, `"podNamespace"="team"`, `"podName"="web-0"`} {
			if !strings.Contains(buf.String(), want) {
				t.Errorf("%s: log lacks %s:\n%s", name, want, buf.String())
			}
		}
	}
}
