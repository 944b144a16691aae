package image

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"sort"
	"sync"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
)

// benchImage is a generated image of about 100 MiB: 4 layers of 25 files
// of 1 MiB each, half random (incompressible) and half text.
var (
	benchOnce  sync.Once
	benchImg   v1.Image
	benchBytes int64
)

func benchImage(b *testing.B) v1.Image {
	benchOnce.Do(func() {
		rng := rand.New(rand.NewChaCha8([32]byte{1}))
		var layers []v1.Layer
		for l := range 4 {
			var es []tarEntry
			for f := range 25 {
				buf := make([]byte, 1<<20)
				if f%2 == 0 {
					for i := range buf {
						buf[i] = byte(rng.Uint32())
					}
				} else {
					for i := range buf {
						buf[i] = "abcdefghij\n"[rng.IntN(11)]
					}
				}
				es = append(es, file(fmt.Sprintf("l%d/f%02d", l, f), string(buf)))
			}
			layers = append(layers, gzLayer(b, tarBytes(b, es...)))
		}
		benchImg = buildImage(b, "amd64", layers...)
		m, _ := benchImg.Manifest()
		for _, l := range m.Layers {
			benchBytes += l.Size
		}
	})
	return benchImg
}

// BenchmarkColdPull measures pull-to-flattened time of the ~100 MiB image
// from a loopback registry into an empty cache (SetBytes: compressed size).
func BenchmarkColdPull(b *testing.B) {
	for _, sync := range []bool{false, true} {
		b.Run(fmt.Sprintf("syncfs=%v", sync), func(b *testing.B) {
			img := benchImage(b)
			reg := newTestRegistry(b)
			ref := reg.push("big:v1", img)
			b.SetBytes(benchBytes)
			b.ResetTimer()
			for range b.N {
				b.StopTimer()
				dir, _ := os.MkdirTemp("", "bench-cache-")
				c, err := NewCache(Config{Dir: dir, NoSync: !sync, InsecureRegistries: []string{"127.0.0.1"}})
				if err != nil {
					b.Fatal(err)
				}
				b.StartTimer()
				im, err := c.Get(context.Background(), ref, PullIfNotPresent, nil)
				if err != nil {
					b.Fatal(err)
				}
				b.StopTimer()
				im.Release()
				c.Close()
				os.RemoveAll(dir)
				b.StartTimer()
			}
			b.StopTimer()
		})
	}
}

// BenchmarkWarmGet measures Get of a cached image (pin, release), with
// IfNotPresent (no network) and Always (one manifest round trip to the
// loopback registry), and reports the p99.
func BenchmarkWarmGet(b *testing.B) {
	reg := newTestRegistry(b)
	ref := reg.push("warm:v1", simpleImage(b, map[string]string{"f": "x"}))
	dir := b.TempDir()
	c, err := NewCache(Config{Dir: dir, NoSync: true, InsecureRegistries: []string{"127.0.0.1"}})
	if err != nil {
		b.Fatal(err)
	}
	defer c.Close()
	im, err := c.Get(context.Background(), ref, PullIfNotPresent, nil)
	if err != nil {
		b.Fatal(err)
	}
	im.Release()
	for _, p := range []PullPolicy{PullIfNotPresent, PullAlways} {
		b.Run(p.String(), func(b *testing.B) {
			lat := make([]time.Duration, 0, b.N)
			for range b.N {
				t0 := time.Now()
				im, err := c.Get(context.Background(), ref, p, nil)
				if err != nil {
					b.Fatal(err)
				}
				im.Release()
				lat = append(lat, time.Since(t0))
			}
			sort.Slice(lat, func(i, j int) bool { return lat[i] < lat[j] })
			b.ReportMetric(float64(lat[len(lat)*99/100].Microseconds()), "p99-µs")
		})
	}
}
