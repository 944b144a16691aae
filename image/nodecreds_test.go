package image

import (
	"encoding/base64"
	"errors"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-containerregistry/pkg/authn"
)

// writeDockerConfig writes a config.json holding user:pass for host.
func writeDockerConfig(t *testing.T, path, host, user, pass string) {
	t.Helper()
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	if err := os.WriteFile(path, []byte(`{"auths":{"`+host+`":{"auth":"`+auth+`"}}}`), 0o600); err != nil {
		t.Fatal(err)
	}
}

// The node's config.json serves a volume that has no pull secret; the
// first file of the search list that exists is the one read.
func TestNodeDockerConfig(t *testing.T) {
	reg := newTestRegistry(t)
	reg.user, reg.pass = "node", "n0de-Pa55"
	ref := reg.push("private:v1", simpleImage(t, map[string]string{"f": "node"}))

	dir := t.TempDir()
	missing := filepath.Join(dir, "missing.json")
	wrong := filepath.Join(dir, "wrong.json")
	node := filepath.Join(dir, "config.json")
	writeDockerConfig(t, node, reg.host, reg.user, reg.pass)
	writeDockerConfig(t, wrong, reg.host, reg.user, "wrong")

	// Without node credentials: refused.
	c0 := newTestCache(t, Config{})
	if _, err := get(t, c0, ref, PullIfNotPresent, nil); !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("no credentials: err = %v, want ErrUnauthorized", err)
	}

	c := newTestCache(t, Config{NodeDockerConfigs: []string{missing, node, wrong}})
	img, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil {
		t.Fatalf("node credentials: %v", err)
	}
	defer img.Release()
	if got := readFile(t, img.Root, "f"); got != "node" {
		t.Errorf("f = %q", got)
	}

	// The volume's pull secret comes first, even when it is wrong.
	kc, err := KeychainFromSecrets(map[string]string{DockerConfigJSONKey: `{"auths":{"` + reg.host + `":{"username":"node","password":"bad"}}}`})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := get(t, c, ref, PullAlways, kc); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("wrong pull secret: err = %v, want ErrUnauthorized", err)
	}

	// A secret for another registry leaves the node's credentials in use.
	kc, _ = KeychainFromSecrets(map[string]string{DockerConfigJSONKey: `{"auths":{"other.example":{"username":"a","password":"b"}}}`})
	img2, err := get(t, c, ref, PullAlways, kc)
	if err != nil {
		t.Fatalf("secret for another registry: %v", err)
	}
	img2.Release()
}

func TestNodeDockerConfigFormats(t *testing.T) {
	dir := t.TempDir()
	res := func(ref string) authn.Resource { return mustRepo(t, ref) }
	for _, tc := range []struct {
		name, content string
		ok            bool
	}{
		{"config.json", `{"auths":{"reg.example":{"username":"u","password":"p"}},"credsStore":"desktop"}`, true},
		{".dockercfg", `{"https://reg.example":{"auth":"` + base64.StdEncoding.EncodeToString([]byte("u:p")) + `"}}`, true},
		{"malformed", `{"auths":`, false},
	} {
		p := filepath.Join(dir, tc.name)
		os.WriteFile(p, []byte(tc.content), 0o600)
		n, err := newNodeConfigKeychain([]string{p}, discardLogger())
		if err != nil {
			t.Fatal(err)
		}
		cfg, ok := n.lookup(res("reg.example/app"))
		if ok != tc.ok || (ok && (cfg.Username != "u" || cfg.Password != "p")) {
			t.Errorf("%s: lookup = %+v, %v; want ok=%v", tc.name, cfg, ok, tc.ok)
		}
	}
	if _, err := newNodeConfigKeychain([]string{"relative/config.json"}, discardLogger()); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("relative path: err = %v, want ErrInvalidArgument", err)
	}
}
