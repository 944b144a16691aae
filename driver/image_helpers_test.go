package driver

import (
	"archive/tar"
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
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/csi-memfs/csi-memfs/internal/imagetest"
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
	if !imagetest.BasicAuth(w, req, r.user, r.pass) {
		return
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

// layerEntry is one entry of a test layer.
type layerEntry = imagetest.Entry

func dirEntry(n string) layerEntry { return imagetest.Dir(n, 0o755) }

var (
	fileEntry     = imagetest.File
	symlinkEntry  = imagetest.Symlink
	hardlinkEntry = imagetest.Hardlink
)

// layer builds a gzip-compressed layer of entries.
func layer(t testing.TB, entries ...layerEntry) v1.Layer {
	t.Helper()
	return imagetest.GzLayer(t, imagetest.Tar(t, entries...))
}

// buildImage makes an image of this node's platform from layers, bottom
// first.
func buildImage(t testing.TB, layers ...v1.Layer) v1.Image {
	t.Helper()
	return imagetest.Image(t, runtime.GOARCH, layers...)
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
			dirEntry("bin/"), layerEntry{Name: "bin/tool", Type: tar.TypeReg, Body: "tool-v1", Mode: 0o755},
			dirEntry("share/"), fileEntry("share/big", strings.Repeat("0123456789abcdef", big/16)),
		),
		layer(t,
			fileEntry(".wh.gone", ""),
			dirEntry("data/old/"), fileEntry("data/old/.wh..wh..opq", ""), fileEntry("data/old/b", "b"),
			dirEntry("bin/"), layerEntry{Name: "bin/tool", Type: tar.TypeReg, Body: "tool-v2", Mode: 0o755},
			hardlinkEntry("bin/tool-link", "bin/tool"),
			symlinkEntry("etc/link", "app.conf"),
		),
		layer(t, fileEntry("etc/new.conf", "new\n")),
	)
}
