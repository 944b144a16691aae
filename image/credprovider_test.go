package image

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/go-logr/logr"
	"github.com/go-logr/logr/funcr"
)

// testPlugin writes a credential provider plugin, a shell script that
// appends its stdin to a file and prints response (or fails with exit
// code 1 and a line on stderr when response is ""), and its config. It
// returns the config file and a function reading the requests so far.
func testPlugin(t *testing.T, matchImages []string, response string) (configFile, binDir string, requests func() []string) {
	t.Helper()
	dir := t.TempDir()
	binDir = filepath.Join(dir, "bin")
	os.Mkdir(binDir, 0o755)
	reqs := filepath.Join(dir, "requests")
	body := "cat >> " + reqs + "\necho >> " + reqs + "\n"
	if response == "" {
		body += "echo 'token endpoint unreachable' >&2\nexit 1\n"
	} else {
		body += "cat <<'EOF'\n" + response + "\nEOF\n"
	}
	if err := os.WriteFile(filepath.Join(binDir, "test-plugin"), []byte("#!/bin/sh\n"+body), 0o755); err != nil {
		t.Fatal(err)
	}
	var m []string
	for _, p := range matchImages {
		m = append(m, fmt.Sprintf("      - %q", p))
	}
	configFile = filepath.Join(dir, "config.yaml")
	config := `apiVersion: kubelet.config.k8s.io/v1
kind: CredentialProviderConfig
providers:
  - name: test-plugin
    apiVersion: credentialprovider.kubelet.k8s.io/v1
    defaultCacheDuration: 10m
    matchImages:
` + strings.Join(m, "\n") + `
    args: [get-credentials]
    env:
      - name: PLUGIN_MODE
        value: test
`
	if err := os.WriteFile(configFile, []byte(config), 0o644); err != nil {
		t.Fatal(err)
	}
	return configFile, binDir, func() []string {
		b, _ := os.ReadFile(reqs)
		return strings.Fields(string(b))
	}
}

// logSink collects log lines.
type logSink struct {
	mu    sync.Mutex
	lines []string
}

func (l *logSink) logger() logr.Logger {
	return funcr.New(func(prefix, args string) {
		l.mu.Lock()
		l.lines = append(l.lines, args)
		l.mu.Unlock()
	}, funcr.Options{})
}

func (l *logSink) String() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return strings.Join(l.lines, "\n")
}

func TestCredentialProvider(t *testing.T) {
	reg := newTestRegistry(t)
	reg.user, reg.pass = "plugin-user", "Plugin-Pa55"
	ref1 := reg.push("private/app:v1", simpleImage(t, map[string]string{"f": "1"}))
	ref2 := reg.push("private/app:v2", simpleImage(t, map[string]string{"f": "2"}))
	public := newTestRegistry(t)
	pubRef := public.push("public:v1", simpleImage(t, map[string]string{"f": "p"}))

	resp := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderResponse",
	"cacheKeyType":"Registry","cacheDuration":"1h",
	"auth":{"` + reg.host + `":{"username":"plugin-user","password":"Plugin-Pa55"}}}`
	cfgFile, binDir, requests := testPlugin(t, []string{reg.host + "/private"}, resp)
	var log logSink
	c := newTestCache(t, Config{CredentialProviderConfig: cfgFile, CredentialProviderBinDir: binDir, Logger: log.logger()})

	for _, ref := range []string{ref1, ref2} {
		img, err := get(t, c, ref, PullIfNotPresent, nil)
		if err != nil {
			t.Fatalf("%s: %v (log: %s)", ref, err, &log)
		}
		img.Release()
	}
	got := requests()
	want := `{"apiVersion":"credentialprovider.kubelet.k8s.io/v1","kind":"CredentialProviderRequest","image":"` + ref1 + `"}`
	if len(got) != 1 || got[0] != want {
		t.Errorf("plugin requests = %q, want one: %s", got, want)
	}

	// An image matchImages does not match: the plugin is not run.
	img, err := get(t, c, pubRef, PullIfNotPresent, nil)
	if err != nil {
		t.Fatal(err)
	}
	img.Release()
	if got := requests(); len(got) != 1 {
		t.Errorf("plugin ran %d times, want once: %q", len(got), got)
	}
	if strings.Contains(log.String(), "Pa55") {
		t.Errorf("the log holds a credential: %s", &log)
	}
}

func TestCredentialProviderFails(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("app:v1", simpleImage(t, map[string]string{"f": "1"}))
	private := newTestRegistry(t)
	private.user, private.pass = "u", "p"
	cfgFile, binDir, requests := testPlugin(t, []string{"*.example.com", reg.host, private.host}, "")
	var log logSink
	c := newTestCache(t, Config{CredentialProviderConfig: cfgFile, CredentialProviderBinDir: binDir, Logger: log.logger()})
	img, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil {
		t.Fatalf("a failing plugin failed the pull: %v", err)
	}
	img.Release()
	if len(requests()) == 0 {
		t.Error("the plugin did not run")
	}
	if l := log.String(); !strings.Contains(l, "Credential provider failed") || !strings.Contains(l, "token endpoint unreachable") {
		t.Errorf("log = %s, want the failure and the plugin's stderr", l)
	}

	// A private image: the pull fails as unauthorized, nothing of the
	// plugin in the error.
	ref2 := private.push("app:v2", simpleImage(t, map[string]string{"f": "2"}))
	_, err = get(t, c, ref2, PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnauthorized) || strings.Contains(err.Error(), "token endpoint") {
		t.Errorf("err = %v, want ErrUnauthorized without the plugin's output", err)
	}
}

func TestCredentialProviderTimeout(t *testing.T) {
	dir := t.TempDir()
	os.WriteFile(filepath.Join(dir, "slow"), []byte("#!/bin/sh\nsleep 10\n"), 0o755)
	pk := &providerKeychains{binDir: dir, timeout: 200 * time.Millisecond, log: logr.Discard(), cache: map[providerCacheKey]providerCacheEntry{}}
	p := &credentialProvider{Name: "slow", APIVersion: "credentialprovider.kubelet.k8s.io/v1", DefaultCacheDuration: &duration{time.Minute}}
	start := time.Now()
	_, err := pk.exec(p, "reg.example/app")
	if err == nil || !strings.Contains(err.err.Error(), "timed out") {
		t.Errorf("err = %v, want a timeout", err)
	}
	if d := time.Since(start); d > 5*time.Second {
		t.Errorf("the plugin ran for %v", d)
	}
}

func TestImageMatches(t *testing.T) {
	for _, tc := range []struct {
		pattern, image string
		want           bool
	}{
		{"*.azurecr.io", "myregistry.azurecr.io/app:v1", true},
		{"*.azurecr.io", "a.b.azurecr.io/app", false},
		{"*.*.azurecr.io", "a.b.azurecr.io/app", true},
		{"*.dkr.ecr.*.amazonaws.com", "123.dkr.ecr.us-east-1.amazonaws.com/app", true},
		{"gcr.io", "gcr.io/project/app", true},
		{"gcr.io", "us.gcr.io/project/app", false},
		{"registry.io:8080/path", "registry.io:8080/path/app", true},
		{"registry.io:8080/path", "registry.io/path/app", false},
		{"registry.io/path", "registry.io:8080/path/app", false},
		{"registry.io/team", "registry.io/other/app", false},
		{"registry.io/team", "registry.io/teamx/app", true}, // kubelet's prefix match
		{"docker.io", "docker.io/library/busybox:latest", true},
		{"*", "localhost/app", true},
		{"[", "x/app", false},
	} {
		if got := imageMatches(tc.pattern, tc.image); got != tc.want {
			t.Errorf("imageMatches(%q, %q) = %v, want %v", tc.pattern, tc.image, got, tc.want)
		}
	}
}

func TestParseCredentialProviderConfig(t *testing.T) {
	good := `{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"ecr","matchImages":["*.dkr.ecr.*.amazonaws.com"],"defaultCacheDuration":"12h","apiVersion":"credentialprovider.kubelet.k8s.io/v1","env":[{"name":"K","value":"SECRETVALUE"}]}]}`
	if _, err := parseCredentialProviderConfig([]byte(good)); err != nil {
		t.Fatalf("good config: %v", err)
	}
	for _, bad := range []string{
		``,
		`{"apiVersion":"v1","kind":"CredentialProviderConfig","providers":[]}`,
		strings.Replace(good, `"name":"ecr"`, `"name":"../ecr"`, 1),
		strings.Replace(good, `"12h"`, `"SECRETVALUE"`, 1),
		strings.Replace(good, `"defaultCacheDuration":"12h",`, ``, 1),
		strings.Replace(good, `"matchImages":["*.dkr.ecr.*.amazonaws.com"]`, `"matchImages":[]`, 1),
		strings.Replace(good, `"env":`, `"tokenAttributes":{},"env":`, 1),
		strings.Replace(good, `"env":`, `"envv":`, 1),
		strings.Replace(good, `"name":"K"`, `"name":"K=SECRETVALUE"`, 1),
		strings.Replace(good, `"credentialprovider.kubelet.k8s.io/v1"`, `"v2"`, 1),
	} {
		_, err := parseCredentialProviderConfig([]byte(bad))
		if !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%s: err = %v, want ErrInvalidArgument", bad, err)
		} else if strings.Contains(err.Error(), "SECRETVALUE") {
			t.Errorf("error quotes a value: %v", err)
		}
	}
}

// FuzzCredentialProviderConfig: any bytes parse or fail with
// ErrInvalidArgument, never panic; a parsed config holds only plugin
// names that stay in the bin dir.
func FuzzCredentialProviderConfig(f *testing.F) {
	f.Add([]byte(`{"apiVersion":"kubelet.config.k8s.io/v1","kind":"CredentialProviderConfig","providers":[{"name":"ecr","matchImages":["*.dkr.ecr.*.amazonaws.com"],"defaultCacheDuration":"12h","apiVersion":"credentialprovider.kubelet.k8s.io/v1"}]}`))
	f.Add([]byte("apiVersion: kubelet.config.k8s.io/v1\nkind: CredentialProviderConfig\nproviders:\n- name: gcp\n  matchImages: [\"gcr.io\", \"*.pkg.dev:443/p\"]\n  defaultCacheDuration: 0s\n  apiVersion: credentialprovider.kubelet.k8s.io/v1beta1\n  args: [a]\n  env: [{name: A, value: b}]\n"))
	f.Add([]byte("providers: &a [*a]\n"))
	f.Add([]byte("- [\n"))
	f.Fuzz(func(t *testing.T, b []byte) {
		cfg, err := parseCredentialProviderConfig(b)
		if err != nil {
			if !errors.Is(err, ErrInvalidArgument) {
				t.Fatalf("err = %v, want ErrInvalidArgument", err)
			}
			return
		}
		for _, p := range cfg.Providers {
			if filepath.Base(p.Name) != p.Name || p.Name == ".." || p.Name == "." || p.DefaultCacheDuration == nil || len(p.MatchImages) == 0 {
				t.Fatalf("accepted provider %+v", p)
			}
			for _, m := range p.MatchImages {
				imageMatches(m, "reg.example:5000/a/b:c")
			}
		}
	})
}

// FuzzCredentialProviderResponse: a plugin's answer parses or fails,
// never panics, and a failure quotes nothing of it.
func FuzzCredentialProviderResponse(f *testing.F) {
	const v1 = "credentialprovider.kubelet.k8s.io/v1"
	f.Add([]byte(`{"apiVersion":"` + v1 + `","kind":"CredentialProviderResponse","cacheKeyType":"Registry","cacheDuration":"1h","auth":{"*.example.com":{"username":"u","password":"p"}}}`))
	f.Add([]byte(`{"apiVersion":"` + v1 + `","kind":"CredentialProviderResponse","cacheKeyType":"Image","auth":{"":{}}}`))
	f.Add([]byte(`{"cacheDuration":"-1h"}`))
	f.Add([]byte(`{"auth":{"x":{"password":1}}}`))
	f.Fuzz(func(t *testing.T, b []byte) {
		r, err := parseCredentialProviderResponse(b, v1)
		if err != nil {
			if msg := err.Error(); len(b) >= 8 && strings.Contains(msg, string(b)) {
				t.Fatalf("error quotes the answer: %v", err)
			}
			return
		}
		switch r.CacheKeyType {
		case "Image", "Registry", "Global":
		default:
			t.Fatalf("accepted cacheKeyType %q", r.CacheKeyType)
		}
		if r.CacheDuration != nil && r.CacheDuration.Duration < 0 {
			t.Fatalf("accepted a negative duration")
		}
	})
}
