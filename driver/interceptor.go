package driver

import (
	"context"
	"path"
	"strings"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/kubernetes-csi/csi-lib-utils/protosanitizer"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"k8s.io/klog/v2"
)

// interceptor wraps every CSI call: it puts a logger naming the method into
// the context, logs the request (secrets and service account tokens
// stripped) and the response at V(4), and records the call's code and
// duration in the metrics.
func (d *Driver) interceptor(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	method := path.Base(info.FullMethod)
	logger := klog.FromContext(ctx).WithValues("method", method)
	ctx = klog.NewContext(ctx, logger)
	if v := logger.V(4); v.Enabled() {
		v.Info("Request", "request", protosanitizer.StripSecrets(withoutTokens(req)))
	}
	if strings.HasPrefix(method, "Node") {
		// A handover waits for Node calls in flight and refuses later
		// ones (the successor answers them).
		d.rpcMu.RLock()
		if d.handingOver.Load() {
			d.rpcMu.RUnlock()
			d.metrics.observeRPC(method, codes.Unavailable, 0)
			return nil, toStatus(errHandingOver)
		}
		defer d.rpcMu.RUnlock()
	}
	start := time.Now()
	resp, err := handler(ctx, req)
	elapsed := time.Since(start)
	code := status.Code(err)
	d.metrics.observeRPC(method, code, elapsed)
	if v := logger.V(4); v.Enabled() {
		v.Info("Response", "code", code.String(), "duration", elapsed, "response", protosanitizer.StripSecrets(resp), "err", err)
	}
	return resp, err
}

// withoutTokens returns req, or a copy of a publish request whose service
// account tokens (a volume attribute kubelet adds when the CSIDriver asks
// for tokens, not marked csi_secret) are replaced by a placeholder.
func withoutTokens(req any) any {
	pub, ok := req.(*csi.NodePublishVolumeRequest)
	if !ok {
		return req
	}
	if _, has := pub.GetVolumeContext()[attrTokens]; !has {
		return req
	}
	c := proto.Clone(pub).(*csi.NodePublishVolumeRequest)
	c.VolumeContext[attrTokens] = "***stripped***"
	return c
}
