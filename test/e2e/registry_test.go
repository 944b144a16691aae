//go:build e2e

package e2e

import (
	"archive/tar"
	"bytes"
	"crypto/rand"
	"encoding/base64"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"log"
	"net"
	"net/http"
	"sort"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// testRegistry is an OCI registry on the node's loopback address that
// wants basic auth. The plugin pod uses the host network, so it reaches it
// at the same address.
type testRegistry struct {
	host, user, password string
}

func startRegistry(t *testing.T) *testRegistry {
	t.Helper()
	pw := make([]byte, 12)
	rand.Read(pw)
	r := &testRegistry{user: "e2e", password: hex.EncodeToString(pw)}
	inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
	h := http.HandlerFunc(func(w http.ResponseWriter, req *http.Request) {
		if u, p, ok := req.BasicAuth(); !ok || u != r.user || p != r.password {
			w.Header().Set("WWW-Authenticate", `Basic realm="e2e"`)
			http.Error(w, `{"errors":[{"code":"UNAUTHORIZED","message":"authentication required"}]}`, http.StatusUnauthorized)
			return
		}
		inner.ServeHTTP(w, req)
	})
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	srv := &http.Server{Handler: h}
	go srv.Serve(l)
	t.Cleanup(func() { srv.Close() })
	r.host = l.Addr().String()
	return r
}

// push uploads a one-layer image holding files and returns its reference.
func (r *testRegistry) push(t *testing.T, repoTag string, files map[string]string) string {
	t.Helper()
	var buf bytes.Buffer
	tw := tar.NewWriter(&buf)
	names := make([]string, 0, len(files))
	for n := range files {
		names = append(names, n)
	}
	sort.Strings(names)
	dirs := map[string]bool{}
	for _, n := range names {
		if i := strings.LastIndex(n, "/"); i > 0 && !dirs[n[:i]] {
			dirs[n[:i]] = true
			tw.WriteHeader(&tar.Header{Typeflag: tar.TypeDir, Name: n[:i] + "/", Mode: 0o755})
		}
		tw.WriteHeader(&tar.Header{Typeflag: tar.TypeReg, Name: n, Mode: 0o644, Size: int64(len(files[n]))})
		tw.Write([]byte(files[n]))
	}
	tw.Close()
	layer, err := tarball.LayerFromOpener(func() (io.ReadCloser, error) {
		return io.NopCloser(bytes.NewReader(buf.Bytes())), nil
	})
	if err != nil {
		t.Fatal(err)
	}
	img, err := mutate.AppendLayers(empty.Image, layer)
	if err != nil {
		t.Fatal(err)
	}
	ref := r.host + "/" + repoTag
	parsed, err := name.ParseReference(ref, name.Insecure)
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(parsed, img, remote.WithAuth(&authn.Basic{Username: r.user, Password: r.password})); err != nil {
		t.Fatalf("pushing %s: %v", ref, err)
	}
	return ref
}

// secret creates the kubernetes.io/dockerconfigjson secret for the
// registry in the test namespace.
func (r *testRegistry) secret(t *testing.T, secretName string) {
	t.Helper()
	cfg, _ := json.Marshal(map[string]any{"auths": map[string]any{r.host: map[string]string{
		"username": r.user, "password": r.password,
		"auth": base64.StdEncoding.EncodeToString([]byte(r.user + ":" + r.password)),
	}}})
	manifest := fmt.Sprintf(`apiVersion: v1
kind: Secret
metadata:
  name: %s
  namespace: %s
type: kubernetes.io/dockerconfigjson
data:
  .dockerconfigjson: %s
`, secretName, testNS, base64.StdEncoding.EncodeToString(cfg))
	if out, err := kubectlIn(strings.NewReader(manifest), "apply", "-f", "-"); err != nil {
		t.Fatalf("creating secret: %v\n%s", err, out)
	}
}
