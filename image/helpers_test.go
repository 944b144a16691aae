package image

import (
	"bytes"
	"context"
	"crypto/rand"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/csi-memfs/csi-memfs/internal/imagetest"
)

// testRegistry is go-containerregistry's in-memory registry on loopback,
// with knobs to fail in the ways the tests need.
type testRegistry struct {
	t     testing.TB
	srv   *httptest.Server
	inner http.Handler
	// host is "127.0.0.1:PORT".
	host string
	// user and pass, if set, are required (HTTP basic auth).
	user, pass string

	mu sync.Mutex
	// blobGets counts GETs per blob digest. Protected by mu.
	blobGets map[string]int
	// corrupt makes GETs of these blobs return one byte flipped.
	corrupt map[string]bool
	// cut makes the first GET of these blobs stop halfway and the server
	// stop accepting connections: the registry dies mid-pull.
	cut map[string]bool
	// slow makes blob GETs trickle (chunk bytes every delay).
	slow  time.Duration
	chunk int
	// done is closed when the test ends, to stop slow handlers.
	done chan struct{}
}

func newTestRegistry(t testing.TB) *testRegistry {
	t.Helper()
	r := &testRegistry{
		t:        t,
		inner:    registry.New(registry.Logger(log.New(io.Discard, "", 0))),
		blobGets: make(map[string]int),
		corrupt:  make(map[string]bool),
		cut:      make(map[string]bool),
		done:     make(chan struct{}),
	}
	r.srv = httptest.NewServer(r)
	r.host = strings.TrimPrefix(r.srv.URL, "http://")
	t.Cleanup(func() {
		close(r.done)
		r.srv.CloseClientConnections()
		r.srv.Close()
	})
	return r
}

// blobDigest returns the digest if req is a GET of a blob.
func blobDigest(req *http.Request) string {
	if req.Method != http.MethodGet {
		return ""
	}
	i := strings.LastIndex(req.URL.Path, "/blobs/")
	if i < 0 || !strings.HasPrefix(req.URL.Path, "/v2/") {
		return ""
	}
	return req.URL.Path[i+len("/blobs/"):]
}

func (r *testRegistry) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if !imagetest.BasicAuth(w, req, r.user, r.pass) {
		return
	}
	d := blobDigest(req)
	if d == "" {
		r.inner.ServeHTTP(w, req)
		return
	}
	r.mu.Lock()
	r.blobGets[d]++
	corrupt, cut, slow, chunk := r.corrupt[d], r.cut[d], r.slow, r.chunk
	delete(r.cut, d)
	r.mu.Unlock()
	if !corrupt && !cut && slow == 0 {
		r.inner.ServeHTTP(w, req)
		return
	}
	rec := httptest.NewRecorder()
	r.inner.ServeHTTP(rec, req)
	body := rec.Body.Bytes()
	for k, v := range rec.Header() {
		w.Header()[k] = v
	}
	if rec.Code != http.StatusOK {
		w.WriteHeader(rec.Code)
		w.Write(body)
		return
	}
	if corrupt {
		body = bytes.Clone(body)
		body[len(body)/2] ^= 0xff
	}
	w.WriteHeader(http.StatusOK)
	switch {
	case cut:
		w.Write(body[:len(body)/2])
		w.(http.Flusher).Flush()
		// The registry goes away: no new connections, this one dropped.
		r.srv.Listener.Close()
		conn, _, err := http.NewResponseController(w).Hijack()
		if err == nil {
			conn.Close()
		}
	case slow > 0:
		for off := 0; off < len(body); off += chunk {
			end := min(off+chunk, len(body))
			if _, err := w.Write(body[off:end]); err != nil {
				return
			}
			w.(http.Flusher).Flush()
			select {
			case <-time.After(slow):
			case <-req.Context().Done():
				return
			case <-r.done:
				return
			}
		}
	default:
		w.Write(body)
	}
}

func (r *testRegistry) gets(digest string) int {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.blobGets[digest]
}

func (r *testRegistry) totalBlobGets() int {
	r.mu.Lock()
	defer r.mu.Unlock()
	n := 0
	for _, v := range r.blobGets {
		n += v
	}
	return n
}

// push writes img (or an index) to repo:tag on the registry.
func (r *testRegistry) push(repoTag string, img v1.Image) string {
	r.t.Helper()
	ref, err := name.ParseReference(r.host + "/" + repoTag)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := remote.Write(ref, img, r.pushAuth()...); err != nil {
		r.t.Fatalf("push %s: %v", ref, err)
	}
	return ref.Name()
}

func (r *testRegistry) pushIndex(repoTag string, idx v1.ImageIndex) string {
	r.t.Helper()
	ref, err := name.ParseReference(r.host + "/" + repoTag)
	if err != nil {
		r.t.Fatal(err)
	}
	if err := remote.WriteIndex(ref, idx, r.pushAuth()...); err != nil {
		r.t.Fatalf("push %s: %v", ref, err)
	}
	return ref.Name()
}

func (r *testRegistry) pushAuth() []remote.Option {
	if r.user == "" {
		return nil
	}
	return []remote.Option{remote.WithAuth(&authn.Basic{Username: r.user, Password: r.pass})}
}

// The layer and image builders, under the names these tests use.
type tarEntry = imagetest.Entry

var (
	testTime   = imagetest.Time
	dir        = imagetest.Dir
	file       = imagetest.File
	symlink    = imagetest.Symlink
	hardlink   = imagetest.Hardlink
	tarBytes   = imagetest.Tar
	gzLayer    = imagetest.GzLayer
	zstdLayer  = imagetest.ZstdLayer
	buildImage = imagetest.Image
)

// simpleImage makes a one-layer image holding the files name -> body.
func simpleImage(t testing.TB, files map[string]string) v1.Image {
	var es []tarEntry
	for n, b := range files {
		es = append(es, file(n, b))
	}
	return buildImage(t, "amd64", gzLayer(t, tarBytes(t, es...)))
}

// newTestCache opens a cache in a temp dir with fast retries.
func newTestCache(t testing.TB, cfg Config) *Cache {
	t.Helper()
	if cfg.Dir == "" {
		cfg.Dir = t.TempDir()
	}
	cfg.NoSync = true
	if cfg.InsecureRegistries == nil {
		// The test registries are on loopback, over plain HTTP.
		cfg.InsecureRegistries = []string{"127.0.0.1"}
	}
	c, err := NewCache(cfg)
	if err != nil {
		t.Fatal(err)
	}
	c.retry = remote.Backoff{Duration: 10 * time.Millisecond, Factor: 2, Steps: 2}
	t.Cleanup(func() {
		c.checkInvariants()
		c.Close()
	})
	return c
}

// get is Get with a test timeout.
func get(t testing.TB, c *Cache, ref string, p PullPolicy, kc authn.Keychain) (*Image, error) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	return c.Get(ctx, ref, p, kc)
}

func mustGet(t testing.TB, c *Cache, ref string) *Image {
	t.Helper()
	img, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil {
		t.Fatalf("Get %s: %v", ref, err)
	}
	return img
}

// assertClean checks that no pull left anything behind in tmp/ and that
// images/ holds exactly n trees.
func assertClean(t *testing.T, c *Cache, n int) {
	t.Helper()
	c.wg.Wait()
	tmp, _ := os.ReadDir(c.tmpDir)
	if len(tmp) != 0 {
		t.Errorf("tmp/ holds %d entries, want 0", len(tmp))
	}
	imgs, _ := os.ReadDir(c.imagesDir)
	if len(imgs) != n {
		t.Errorf("images/ holds %d entries, want %d", len(imgs), n)
	}
	if st := c.Stats(); st.Images != n {
		t.Errorf("Stats().Images = %d, want %d", st.Images, n)
	}
}

// randString returns n incompressible bytes.
func randString(n int) string {
	b := make([]byte, n)
	rand.Read(b)
	return string(b)
}

func readFile(t *testing.T, root, p string) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(root, p))
	if err != nil {
		t.Fatalf("read %s: %v", p, err)
	}
	return string(b)
}

// mustRepo parses a repository (or image) reference.
func mustRepo(t testing.TB, ref string) name.Repository {
	t.Helper()
	r, err := name.ParseReference(ref)
	if err != nil {
		t.Fatal(err)
	}
	return r.Context()
}

// discardLogger is a Logger that drops everything.
func discardLogger() logr.Logger { return logr.Discard() }
