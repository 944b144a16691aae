package image

import (
	"context"
	"errors"
	"io"
	"log"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/registry"
)

// A node-local service named as a registry: whatever it answers, no byte
// of its responses reaches the error.
func TestErrorsCarryNoResponseBody(t *testing.T) {
	const secret = "SECRET-node-local"
	reg := newTestRegistry(t)
	ref := reg.push("app:v1", simpleImage(t, map[string]string{"f": "1"}))
	tests := []struct {
		name    string
		handler http.HandlerFunc
		want    error
		status  string
	}{
		{"html page", func(w http.ResponseWriter, r *http.Request) {
			w.Header().Set("Content-Type", "text/html")
			io.WriteString(w, "<html>"+secret+"</html>")
		}, nil, ""},
		{"500 text", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusInternalServerError)
			io.WriteString(w, secret)
		}, ErrUnavailable, "500"},
		{"404 json message", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/v2/" {
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusNotFound)
			io.WriteString(w, `{"errors":[{"code":"MANIFEST_UNKNOWN","message":"`+secret+`","detail":"`+secret+`"}]}`)
		}, ErrNotFound, "MANIFEST_UNKNOWN"},
		{"unknown code", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/v2/" {
				return
			}
			w.Header().Set("Content-Type", "application/json")
			w.WriteHeader(http.StatusBadRequest)
			io.WriteString(w, `{"errors":[{"code":"`+secret+`","message":"m"}]}`)
		}, nil, "400"},
		{"401 body", func(w http.ResponseWriter, r *http.Request) {
			w.WriteHeader(http.StatusUnauthorized)
			io.WriteString(w, secret)
		}, ErrUnauthorized, "401"},
		{"manifest not json", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/v2/" {
				return
			}
			w.Header().Set("Content-Type", "application/vnd.oci.image.manifest.v1+json")
			io.WriteString(w, secret)
		}, nil, ""},
		{"bad media type", func(w http.ResponseWriter, r *http.Request) {
			if r.URL.Path == "/v2/" {
				return
			}
			w.Header().Set("Content-Type", "text/"+secret)
			io.WriteString(w, "{}")
		}, nil, ""},
		{"blob 500", func(w http.ResponseWriter, r *http.Request) {
			if strings.Contains(r.URL.Path, "/blobs/") {
				w.WriteHeader(http.StatusInternalServerError)
				io.WriteString(w, secret)
				return
			}
			reg.ServeHTTP(w, r)
		}, ErrUnavailable, "500"},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			srv := httptest.NewServer(tc.handler)
			defer srv.Close()
			host := strings.TrimPrefix(srv.URL, "http://")
			c := newTestCache(t, Config{})
			_, err := get(t, c, host+strings.TrimPrefix(ref, reg.host), PullIfNotPresent, nil)
			if err == nil {
				t.Fatal("Get succeeded")
			}
			if strings.Contains(err.Error(), secret) {
				t.Errorf("err = %q, quotes the response", err)
			}
			if tc.want != nil && !errors.Is(err, tc.want) {
				t.Errorf("err = %v, want %v", err, tc.want)
			}
			if !strings.Contains(err.Error(), tc.status) {
				t.Errorf("err = %q, want it to say %q", err, tc.status)
			}
			t.Logf("%s: %v", tc.name, err)
		})
	}
}

// A registry the operator listed may redirect blobs elsewhere, but not to
// an address of the node (loopback, link-local) it did not list.
func TestRedirectToNodeAddressRefused(t *testing.T) {
	var hits atomic.Int32
	victim := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		hits.Add(1)
		io.WriteString(w, "node-local secret")
	}))
	defer victim.Close()
	victimPort := victim.URL[strings.LastIndex(victim.URL, ":")+1:]
	for _, target := range []string{
		victim.URL + "/blob",
		"http://localhost:" + victimPort + "/blob",
		"https://localhost:" + victimPort + "/blob",
		"http://169.254.169.254/latest/meta-data/",
		"https://[fe80::1]:443/x",
		"https://0.0.0.0:" + victimPort + "/x",
	} {
		t.Run(target, func(t *testing.T) {
			inner := registry.New(registry.Logger(log.New(io.Discard, "", 0)))
			srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
				if r.Method == http.MethodGet && strings.Contains(r.URL.Path, "/blobs/") {
					http.Redirect(w, r, target, http.StatusTemporaryRedirect)
					return
				}
				inner.ServeHTTP(w, r)
			}))
			defer srv.Close()
			reg := &testRegistry{t: t, srv: srv, host: strings.TrimPrefix(srv.URL, "http://")}
			ref := reg.push("app:v1", simpleImage(t, map[string]string{"f": "1"}))
			// Listed with its port: the victim, on another port, is not.
			c := newTestCache(t, Config{InsecureRegistries: []string{reg.host}})
			_, err := get(t, c, ref, PullIfNotPresent, nil)
			if !errors.Is(err, ErrRegistryNotAllowed) || !errors.Is(err, ErrUnauthorized) {
				t.Fatalf("err = %v, want ErrRegistryNotAllowed", err)
			}
			if strings.Contains(err.Error(), "secret") {
				t.Errorf("err = %q", err)
			}
			t.Logf("refused: %v", err)
		})
	}
	if n := hits.Load(); n != 0 {
		t.Errorf("the node-local service got %d requests", n)
	}
}

// The dialer checks the resolved address: a name that resolves to a
// loopback address is refused before a connection is attempted.
func TestDialChecksResolvedAddress(t *testing.T) {
	var hits atomic.Int32
	victim := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) { hits.Add(1) }))
	defer victim.Close()
	port := victim.URL[strings.LastIndex(victim.URL, ":")+1:]
	p, err := newRegistryPolicy(nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	dial := p.dialContext(nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	conn, err := dial(ctx, "tcp", "localhost:"+port)
	if !errors.Is(err, ErrRegistryNotAllowed) {
		if conn != nil {
			conn.Close()
		}
		t.Fatalf("dial localhost: err = %v, want ErrRegistryNotAllowed", err)
	}
	t.Logf("refused: %v", err)
	// Listed: allowed.
	p, _ = newRegistryPolicy([]string{"localhost:" + port}, nil)
	conn, err = p.dialContext(nil)(ctx, "tcp", "localhost:"+port)
	if err != nil {
		t.Fatalf("listed: %v", err)
	}
	conn.Close()
	// A proxy the environment gives is dialled as configured.
	p, _ = newRegistryPolicy(nil, nil)
	pf := p.proxyFunc(func(*http.Request) (*url.URL, error) { return url.Parse("http://localhost:" + port) })
	req, _ := http.NewRequest(http.MethodGet, "https://registry.example.com/v2/", nil)
	if u, err := pf(req); err != nil || u == nil {
		t.Fatal(u, err)
	}
	conn, err = p.dialContext(nil)(ctx, "tcp", "localhost:"+port)
	if err != nil {
		t.Fatalf("proxy: %v", err)
	}
	conn.Close()
}

// Only the allowed registries, when set.
func TestAllowedRegistries(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("app:v1", simpleImage(t, map[string]string{"f": "1"}))
	c := newTestCache(t, Config{AllowedRegistries: []string{"registry.example.com"}, InsecureRegistries: []string{}})
	for _, r := range []string{ref, "busybox", "docker.io/library/busybox:1", "registry.example.org/a:b"} {
		_, err := get(t, c, r, PullIfNotPresent, nil)
		if !errors.Is(err, ErrRegistryNotAllowed) {
			t.Errorf("%s: err = %v, want ErrRegistryNotAllowed", r, err)
		}
	}
	if st := c.Stats(); st.PullBytes != 0 || reg.totalBlobGets() != 0 {
		t.Errorf("refused pulls fetched something")
	}
	c = newTestCache(t, Config{AllowedRegistries: []string{reg.host}})
	im, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil {
		t.Fatal(err)
	}
	im.Release()
}
