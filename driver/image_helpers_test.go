package driver

import (
	"archive/tar"
	"bytes"
	"compress/gzip"
	"encoding/base64"
	"encoding/json"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"runtime"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	ociregistry "github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// testRegistry is go-containerregistry's in-memory registry served on
// loopback, counting the requests a pull makes, optionally behind basic
// auth and with slow blobs.
type testRegistry struct {
	t     testing.TB
	srv   *httptest.Server
	inner http.Handler
	// host is "127.0.0.1:PORT".
	host string
	// user and pass, if set, are required (HTTP basic auth). Set before
	// the first request.
	user, pass string

	mu sync.Mutex
	// manifestGets and blobGets count GETs. Protected by mu.
	manifestGets, blobGets int
	// blobDelay delays every blob GET. Protected by mu.
	blobDelay time.Duration
	// done ends delays when the test ends.
	done chan struct{}
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	r := &testRegistry{t: t, inner: ociregistry.New(ociregistry.Logger(log.New(io.Discard, "", 0))), done: make(chan struct{})}
	r.srv = httptest.NewServer(r)
	r.host = strings.TrimPrefix(r.srv.URL, "http://")
	t.Cleanup(r.stop)
	return r
}

// stop shuts the registry down: connections are refused from now on.
func (r *testRegistry) stop() {
	select {
	case <-r.done:
		return
	default:
	}
	close(r.done)
	r.srv.CloseClientConnections()
	r.srv.Close()
}

func (r *testRegistry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if r.user != "" {
		u, p, ok := req.BasicAuth()
		if !ok || u != r.user || p != r.pass {
			w.Header().Set("WWW-Authenticate", `Basic realm="test"`)
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`)
			return
		}
	}
	var delay time.Duration
	if req.Method == http.MethodGet {
		r.mu.Lock()
		switch {
		case strings.Contains(req.URL.Path, "/manifests/"):
			r.manifestGets++
		case strings.Contains(req.URL.Path, "/blobs/"):
			r.blobGets++
			delay = r.blobDelay
		}
		r.mu.Unlock()
	}
	if delay > 0 {
		select {
		case <-time.After(delay):
		case <-req.Context().Done():
			return
		case <-r.done:
			return
		}
	}
	r.inner.ServeHTTP(w, req)
}

// counts returns the manifest and blob GETs so far.
func (r *testRegistry) counts() (manifests, blobs int) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.manifestGets, r.blobGets
}

func (r *testRegistry) setBlobDelay(d time.Duration) {
	r.mu.Lock()
	r.blobDelay = d
	r.mu.Unlock()
}

// push writes img to repo:tag and returns its reference.
func (r *testRegistry) push(repoTag string, img v1.Image) string {
	r.t.Helper()
	ref, err := name.ParseReference(r.host + "/" + repoTag)
	if err != nil {
		r.t.Fatal(err)
	}
	var opts []remote.Option
	if r.user != "" {
		opts = append(opts, remote.WithAuth(&authn.Basic{Username: r.user, Password: r.pass}))
	}
	if err := remote.Write(ref, img, opts...); err != nil {
		r.t.Fatalf("push %s: %v", ref, err)
	}
	return ref.Name()
}

// pullSecret is the CSI secrets of a kubernetes.io/dockerconfigjson secret
// for host.
func pullSecret(host, user, pass string) map[string]string {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{host: map[string]string{"auth": auth}}})
	return map[string]string{".dockerconfigjson": string(b)}
}

// entry is one entry of a test layer.
type entry struct {
	name string
	typ  byte
	body string
	mode int64
	link string
}

func dirEntry(n string) entry { return entry{name: n, typ: tar.TypeDir, mode: 0o755} }
func fileEntry(n, body string) entry {
	return entry{name: n, typ: tar.TypeReg, body: body, mode: 0o644}
}
func symlinkEntry(n, target string) entry {
	return entry{name: n, typ: tar.TypeSymlink, link: target, mode: 0o777}
}
func hardlinkEntry(n, target string) entry {
	return entry{name: n, typ: tar.TypeLink, link: target, mode: 0o644}
}

// layer builds a gzip-compressed layer of entries.
func layer(t testing.TB, entries ...entry) v1.Layer {
	t.Helper()
	var buf bytes.Buffer
	zw, _ := gzip.NewWriterLevel(&buf, gzip.BestSpeed)
	tw := tar.NewWriter(zw)
	for _, e := range entries {
		h := &tar.Header{Name: e.name, Typeflag: e.typ, Mode: e.mode, Linkname: e.link,
			ModTime: time.Date(2021, 3, 4, 5, 6, 7, 0, time.UTC), Format: tar.FormatPAX}
		if e.typ == tar.TypeReg {
			h.Size = int64(len(e.body))
		}
		if err := tw.WriteHeader(h); err != nil {
			t.Fatal(err)
		}
		io.WriteString(tw, e.body)
	}
	if err := tw.Close(); err != nil {
		t.Fatal(err)
	}
	zw.Close()
	b := buf.Bytes()
	l, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) { return io.NopCloser(bytes.NewReader(b)), nil },
		tarball.WithMediaType(types.OCILayer))
	if err != nil {
		t.Fatal(err)
	}
	return l
}

// buildImage makes an image of this node's platform from layers, bottom
// first.
func buildImage(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	img, err := mutate.AppendLayers(empty.Image, layers...)
	if err != nil {
		t.Fatal(err)
	}
	cf, err := img.ConfigFile()
	if err != nil {
		t.Fatal(err)
	}
	cf = cf.DeepCopy()
	cf.OS, cf.Architecture = "linux", runtime.GOARCH
	img, err = mutate.ConfigFile(img, cf)
	if err != nil {
		t.Fatal(err)
	}
	return img
}

// layeredImage is the image most tests use: three layers with a whiteout,
// an opaque directory, a hard link, a symlink, files replaced by upper
// layers and a big file.
func layeredImage(t testing.TB, big int) v1.Image {
	t.Helper()
	return buildImage(t,
		layer(t,
			dirEntry("etc/"), fileEntry("etc/app.conf", "conf=1\n"), fileEntry("etc/other.conf", "other\n"),
			fileEntry("etc/motd", "hello\n"),
			dirEntry("data/"), dirEntry("data/old/"), fileEntry("data/old/a", "a"), fileEntry("data/keep", "keep"),
			fileEntry("gone", "gone"),
			dirEntry("bin/"), entry{name: "bin/tool", typ: tar.TypeReg, body: "tool-v1", mode: 0o755},
			dirEntry("share/"), fileEntry("share/big", strings.Repeat("0123456789abcdef", big/16)),
		),
		layer(t,
			fileEntry(".wh.gone", ""),
			dirEntry("data/old/"), fileEntry("data/old/.wh..wh..opq", ""), fileEntry("data/old/b", "b"),
			dirEntry("bin/"), entry{name: "bin/tool", typ: tar.TypeReg, body: "tool-v2", mode: 0o755},
			hardlinkEntry("bin/tool-link", "bin/tool"),
			symlinkEntry("etc/link", "app.conf"),
		),
		layer(t, fileEntry("etc/new.conf", "new\n")),
	)
}
