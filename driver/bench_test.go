package driver

import (
	"context"
	"encoding/binary"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	v1 "github.com/google/go-containerregistry/pkg/v1"
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

// BenchmarkImagePublish measures publish-to-ready of an image volume with a
// warm cache over the real unix socket: from sending NodePublishVolume
// until a file of the image reads through the target path. Run it with
// -benchtime 100x for the p50/p99 of 100 publishes.
func BenchmarkImagePublish(b *testing.B) {
	reg := newTestRegistry(b)
	ref := reg.push("app:v1", layeredImage(b, 1<<20))
	env := startDriver(b, nil)
	ctx := context.Background()
	warm := env.publish(b, "warm", attrs("image", ref))
	env.unpublish(b, "warm", warm)

	lat := make([]time.Duration, 0, b.N)
	var unpublish time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		id := fmt.Sprintf("bench-%d", i)
		target := env.target(b, id)
		start := time.Now()
		if _, err := env.node.NodePublishVolume(ctx, pubReq(id, target, attrs("image", ref, "size", "64Mi"))); err != nil {
			b.Fatal(err)
		}
		if _, err := os.ReadFile(filepath.Join(target, "etc/app.conf")); err != nil {
			b.Fatal(err)
		}
		lat = append(lat, time.Since(start))
		start = time.Now()
		if _, err := env.node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: id, TargetPath: target}); err != nil {
			b.Fatal(err)
		}
		unpublish += time.Since(start)
	}
	b.StopTimer()
	slices.Sort(lat)
	b.ReportMetric(float64(percentile(lat, 50).Microseconds())/1000, "p50-ms")
	b.ReportMetric(float64(percentile(lat, 99).Microseconds())/1000, "p99-ms")
	b.ReportMetric(float64(lat[len(lat)-1].Microseconds())/1000, "max-ms")
	b.ReportMetric(float64(unpublish.Microseconds())/float64(b.N)/1000, "unpublish-ms")
}

// percentile returns the p-th percentile of sorted durations.
func percentile(sorted []time.Duration, p int) time.Duration {
	i := (len(sorted)*p + 99) / 100
	return sorted[max(0, min(i, len(sorted))-1)]
}

// bigImage makes an image of about total bytes of incompressible data in
// layers of files of mixed sizes (4 KiB .. 4 MiB), like an application
// image.
func bigImage(b testing.TB, total int) v1.Image {
	rng := rand.New(rand.NewPCG(1, 2))
	sizes := []int{4 << 10, 32 << 10, 256 << 10, 1 << 20, 4 << 20}
	var layers []v1.Layer
	const perLayer = 25 << 20
	for l := 0; l*perLayer < total; l++ {
		es := []layerEntry{dirEntry(fmt.Sprintf("l%d/", l))}
		for n, size := 0, 0; n < min(perLayer, total-l*perLayer); n += size {
			size = sizes[len(es)%len(sizes)]
			buf := make([]byte, size)
			for i := 0; i+8 <= len(buf); i += 8 {
				binary.LittleEndian.PutUint64(buf[i:], rng.Uint64())
			}
			es = append(es, fileEntry(fmt.Sprintf("l%d/f%04d", l, len(es)), string(buf)))
		}
		layers = append(layers, layer(b, es...))
	}
	return buildImage(b, layers...)
}

// BenchmarkImageColdPull measures cold pull-to-ready: a publish of a
// ~100 MiB image (incompressible, 4 layers) that no cache holds, from the
// loopback registry, until a file reads through the target. Each
// iteration starts a driver on an empty cache; the cache syncs its trees
// as in production.
func BenchmarkImageColdPull(b *testing.B) {
	reg := newTestRegistry(b)
	ref := reg.push("big:v1", bigImage(b, 100<<20))
	ctx := context.Background()
	var total time.Duration
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		b.StopTimer()
		env := startDriver(b, func(c *Config) { c.imageNoSync = false })
		target := env.target(b, "cold")
		b.StartTimer()
		start := time.Now()
		if _, err := env.node.NodePublishVolume(ctx, pubReq("cold", target, attrs("image", ref))); err != nil {
			b.Fatal(err)
		}
		if _, err := os.Stat(filepath.Join(target, "l0/f0001")); err != nil {
			b.Fatal(err)
		}
		total += time.Since(start)
		b.StopTimer()
		env.unpublish(b, "cold", target)
		if i == 0 {
			text := scrape(b, env.metrics)
			v, _ := metricValue(text, "csi_memfs_image_pull_bytes_total")
			b.ReportMetric(v/(1<<20), "pulled-MiB")
			v, _ = metricValue(text, "csi_memfs_image_cache_bytes")
			b.ReportMetric(v/(1<<20), "tree-MiB")
		}
		b.StartTimer()
	}
	b.ReportMetric(total.Seconds()/float64(b.N), "pull-to-ready-s")
}

// BenchmarkImageVolumeMemory measures the memory each volume that only
// reads its image holds: n volumes of one cached image are published and
// every file of each is read through its target; the tmpfs usage of the
// memory layers, the daemon's Go heap and RSS and its open descriptors
// are compared with before the volumes.
//
// The "memory" variant publishes pure memory volumes (no image, nothing to
// read) for comparison: the part of the figures that FUSE serving costs
// any volume.
func BenchmarkImageVolumeMemory(b *testing.B) {
	reg := newTestRegistry(b)
	ref := reg.push("app:v1", bigImage(b, 20<<20))
	b.Run("image", func(b *testing.B) { benchVolumeMemory(b, attrs("image", ref)) })
	b.Run("memory", func(b *testing.B) { benchVolumeMemory(b, attrs()) })
}

func benchVolumeMemory(b *testing.B, a map[string]string) {
	const n = 20
	env := startDriver(b, nil)
	ctx := context.Background()
	warm := env.publish(b, "warm", a)
	readTree(b, warm)
	env.unpublish(b, "warm", warm)
	for i := 0; i < b.N; i++ {
		_, heap0 := settle()
		rss0, fds0 := rssBytes(b), openFds(b)
		targets := make([]string, n)
		for v := range n {
			targets[v] = env.publish(b, fmt.Sprintf("ro-%d", v), a)
			readTree(b, targets[v])
		}
		_, heap1 := settle()
		rss1, fds1 := rssBytes(b), openFds(b)
		var tmpfs int64
		for v := range n {
			st, err := env.node.NodeGetVolumeStats(ctx, &csi.NodeGetVolumeStatsRequest{VolumeId: fmt.Sprintf("ro-%d", v), VolumePath: targets[v]})
			if err != nil {
				b.Fatal(err)
			}
			tmpfs += st.GetUsage()[0].GetUsed()
		}
		for v := range n {
			env.unpublish(b, fmt.Sprintf("ro-%d", v), targets[v])
		}
		b.ReportMetric(float64(tmpfs)/n/1024, "tmpfs-KiB/vol")
		b.ReportMetric(float64(int64(heap1)-int64(heap0))/n/1024, "heap-KiB/vol")
		b.ReportMetric(float64(rss1-rss0)/n/1024, "rss-KiB/vol")
		b.ReportMetric(float64(fds1-fds0)/n, "fds/vol")
	}
}

// readTree reads every file under dir.
func readTree(b testing.TB, dir string) {
	err := filepath.WalkDir(dir, func(p string, d fs.DirEntry, err error) error {
		if err != nil || !d.Type().IsRegular() {
			return err
		}
		_, err = os.ReadFile(p)
		return err
	})
	if err != nil {
		b.Fatal(err)
	}
}

// rssBytes returns this process's resident set size.
func rssBytes(b testing.TB) int64 {
	data, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == "VmRSS:" {
			kb, _ := strconv.ParseInt(f[1], 10, 64)
			return kb << 10
		}
	}
	return 0
}

// openFds counts this process's open descriptors.
func openFds(b testing.TB) int {
	entries, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		b.Fatal(err)
	}
	return len(entries)
}
