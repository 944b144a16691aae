package driver

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
)

// BenchmarkPublish measures publish-to-ready over the real unix socket:
// from sending NodePublishVolume until a file can be created on the target
// path, as a pod's first write. Unpublish is timed separately.
func BenchmarkPublish(b *testing.B) {
	env := startDriver(b, nil)
	ctx := context.Background()
	var publish, unpublish time.Duration
	for i := 0; i < b.N; i++ {
		id := fmt.Sprintf("bench-%d", i)
		target := env.target(b, id)
		start := time.Now()
		if _, err := env.node.NodePublishVolume(ctx, pubReq(id, target, attrs("size", "64Mi"))); err != nil {
			b.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(target, "ready"), nil, 0o644); err != nil {
			b.Fatal(err)
		}
		publish += time.Since(start)
		start = time.Now()
		if _, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			b.Fatal(err)
		}
		unpublish += time.Since(start)
	}
	b.ReportMetric(float64(publish.Microseconds())/float64(b.N), "publish-to-ready-us")
	b.ReportMetric(float64(unpublish.Microseconds())/float64(b.N), "unpublish-us")
}
