package image

import (
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync/atomic"
	"testing"
)

// countingServer answers every request with status and counts them.
func countingServer(t *testing.T, status int) (host string, hits *atomic.Int64) {
	hits = new(atomic.Int64)
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		w.WriteHeader(status)
	}))
	t.Cleanup(srv.Close)
	return strings.TrimPrefix(srv.URL, "http://"), hits
}

// A mirror that has the image serves the pull: the registry is not
// contacted.
func TestMirrorServes(t *testing.T) {
	mirror := newTestRegistry(t)
	mirror.push("team/app:v1", simpleImage(t, map[string]string{"f": "mirrored"}))
	upstream, hits := countingServer(t, http.StatusInternalServerError)
	var log logSink
	c := newTestCache(t, Config{Mirrors: map[string][]string{upstream: {mirror.host}}, Logger: log.logger()})
	img, err := get(t, c, upstream+"/team/app:v1", PullIfNotPresent, nil)
	if err != nil {
		t.Fatalf("%v (log: %s)", err, &log)
	}
	defer img.Release()
	if got := readFile(t, img.Root, "f"); got != "mirrored" {
		t.Errorf("f = %q", got)
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the registry got %d requests, want none", n)
	}
	if mirror.totalBlobGets() == 0 {
		t.Error("the mirror served no blob")
	}
}

// Mirrors that fail (an error, or not having the image) are skipped: the
// registry serves the pull.
func TestMirrorFallsBack(t *testing.T) {
	upstream := newTestRegistry(t)
	ref := upstream.push("team/app:v1", simpleImage(t, map[string]string{"f": "upstream"}))
	broken, brokenHits := countingServer(t, http.StatusBadGateway)
	empty := newTestRegistry(t)
	var log logSink
	c := newTestCache(t, Config{Mirrors: map[string][]string{upstream.host: {broken, empty.host}}, Logger: log.logger()})
	img, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil {
		t.Fatal(err)
	}
	defer img.Release()
	if got := readFile(t, img.Root, "f"); got != "upstream" {
		t.Errorf("f = %q", got)
	}
	if brokenHits.Load() == 0 {
		t.Error("the broken mirror was not tried")
	}
	if l := log.String(); strings.Count(l, "Registry mirror failed") != 2 {
		t.Errorf("log = %s, want two mirror failures", l)
	}
}

// Mirrors follow the registry policy.
func TestMirrorPolicy(t *testing.T) {
	for _, tc := range []struct {
		name string
		cfg  Config
	}{
		{"loopback not listed", Config{Mirrors: map[string][]string{"docker.io": {"127.0.0.1:5000"}}}},
		{"localhost not listed", Config{Mirrors: map[string][]string{"docker.io": {"localhost:5000"}}}},
		{"not in the allow-list", Config{AllowedRegistries: []string{"docker.io"}, Mirrors: map[string][]string{"docker.io": {"mirror.example.com"}}}},
		{"malformed", Config{Mirrors: map[string][]string{"docker.io": {"http://mirror.example.com/x"}}}},
		{"its own", Config{Mirrors: map[string][]string{"docker.io": {"index.docker.io"}}}},
	} {
		tc.cfg.Dir = t.TempDir()
		if _, err := NewCache(tc.cfg); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", tc.name, err)
		}
	}
	c, err := NewCache(Config{Dir: t.TempDir(), InsecureRegistries: []string{"127.0.0.1:5000"},
		AllowedRegistries: []string{"docker.io"}, Mirrors: map[string][]string{"docker.io": {"127.0.0.1:5000"}}})
	if err != nil {
		t.Fatalf("a listed loopback mirror: %v", err)
	}
	defer c.Close()
	s, err := c.parseRef("busybox")
	if err != nil {
		t.Fatal(err)
	}
	if len(s.mirrors) != 1 || s.mirrors[0].Name() != "127.0.0.1:5000/library/busybox:latest" || s.mirrors[0].Context().Scheme() != "http" {
		t.Errorf("mirrors of busybox = %v", s.mirrors)
	}
}
