package image

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-containerregistry/pkg/name"
	"github.com/google/go-containerregistry/pkg/registry"
	"github.com/google/go-containerregistry/pkg/v1/remote"

	"github.com/csi-memfs/csi-memfs/internal/imagetest"
)

// An HTTPS registry whose CA the node does not trust fails with a clear
// Unavailable error; with the CA bundle option it is pulled.
func TestTLSRegistryCABundle(t *testing.T) {
	caPEM, serverTLS := imagetest.TLS(t)
	srv := httptest.NewUnstartedServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	srv.TLS = serverTLS
	srv.Config.ErrorLog = log.New(io.Discard, "", 0)
	srv.StartTLS()
	defer srv.Close()
	host := strings.TrimPrefix(srv.URL, "https://")

	pool := x509.NewCertPool()
	pool.AppendCertsFromPEM(caPEM)
	push := &http.Transport{TLSClientConfig: &tls.Config{RootCAs: pool}}
	ref, err := name.ParseReference(host + "/tls:v1")
	if err != nil {
		t.Fatal(err)
	}
	if err := remote.Write(ref, simpleImage(t, map[string]string{"f": "over TLS"}), remote.WithTransport(push)); err != nil {
		t.Fatal(err)
	}
	caFile := filepath.Join(t.TempDir(), "ca.pem")
	if err := os.WriteFile(caFile, caPEM, 0o600); err != nil {
		t.Fatal(err)
	}

	// Listed (it is on loopback), over HTTPS only.
	c := newTestCache(t, Config{AllowedRegistries: []string{host}, InsecureRegistries: []string{}})
	_, err = get(t, c, ref.Name(), PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnavailable) || !strings.Contains(err.Error(), "unknown authority") {
		t.Fatalf("without the CA: err = %v, want ErrUnavailable naming the unknown authority", err)
	}
	t.Logf("without the CA: %v", err)

	c = newTestCache(t, Config{AllowedRegistries: []string{host}, InsecureRegistries: []string{}, CAFile: caFile})
	im, err := get(t, c, ref.Name(), PullIfNotPresent, nil)
	if err != nil {
		t.Fatalf("with the CA: %v", err)
	}
	defer im.Release()
	if got := readFile(t, im.Root, "f"); got != "over TLS" {
		t.Errorf("f = %q", got)
	}

	// A bad bundle is refused when the cache opens.
	bad := filepath.Join(t.TempDir(), "bad.pem")
	os.WriteFile(bad, []byte("not PEM"), 0o600)
	for _, f := range []string{bad, filepath.Join(t.TempDir(), "missing.pem")} {
		if _, err := NewCache(Config{Dir: t.TempDir(), CAFile: f}); !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("CAFile %s: err = %v, want ErrInvalidArgument", f, err)
		}
	}
}
