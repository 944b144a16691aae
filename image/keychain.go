package image

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"path"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// Keys of a Kubernetes pull secret's data.
const (
	// DockerConfigJSONKey is the key of a kubernetes.io/dockerconfigjson
	// secret: {"auths": {"registry": {...}}}.
	DockerConfigJSONKey = ".dockerconfigjson"
	// DockerCfgKey is the key of a legacy kubernetes.io/dockercfg secret:
	// {"registry": {...}}.
	DockerCfgKey = ".dockercfg"
)

// dockerAuth is one registry's entry in a docker config.
type dockerAuth struct {
	Username      string `json:"username,omitempty"`
	Password      string `json:"password,omitempty"`
	Auth          string `json:"auth,omitempty"`
	IdentityToken string `json:"identitytoken,omitempty"`
	RegistryToken string `json:"registrytoken,omitempty"`
}

// credential is a parsed docker config entry: a host pattern (labels may
// be "*"), an optional repository path prefix, and what to send.
type credential struct {
	host string
	path string
	auth authn.AuthConfig
}

// secretKeychain is an authn.Keychain over the entries of a pull secret.
// It never falls back to the node's own docker config or helpers.
type secretKeychain struct {
	creds []credential
}

// KeychainFromSecrets builds a keychain from the CSI secrets of a volume
// (the data of a kubernetes.io/dockerconfigjson or legacy dockercfg
// secret). No secret, or a secret without those keys, means anonymous
// access. Errors (ErrInvalidArgument) never quote the secret's content.
//
// Matching follows the kubelet: an entry's key is a host[:port] with an
// optional scheme and path; "*" matches one label of the host
// ("*.example.com"); a path limits the entry to repositories under it;
// the most specific matching entry wins; docker.io, index.docker.io and
// registry-1.docker.io are one registry.
func KeychainFromSecrets(secrets map[string]string) (authn.Keychain, error) {
	kc := &secretKeychain{}
	if v, ok := secrets[DockerConfigJSONKey]; ok {
		var cfg struct {
			Auths map[string]dockerAuth `json:"auths"`
		}
		if err := json.Unmarshal([]byte(v), &cfg); err != nil {
			return nil, fmt.Errorf("%w: secret key %s is not a docker config (%s)", ErrInvalidArgument, DockerConfigJSONKey, jsonErrorWhere(err))
		}
		if err := kc.add(cfg.Auths); err != nil {
			return nil, fmt.Errorf("%w: secret key %s: %v", ErrInvalidArgument, DockerConfigJSONKey, err)
		}
	}
	if v, ok := secrets[DockerCfgKey]; ok {
		var auths map[string]dockerAuth
		if err := json.Unmarshal([]byte(v), &auths); err != nil {
			return nil, fmt.Errorf("%w: secret key %s is not a docker config (%s)", ErrInvalidArgument, DockerCfgKey, jsonErrorWhere(err))
		}
		if err := kc.add(auths); err != nil {
			return nil, fmt.Errorf("%w: secret key %s: %v", ErrInvalidArgument, DockerCfgKey, err)
		}
	}
	return kc, nil
}

// jsonErrorWhere describes a JSON error by position or field only.
func jsonErrorWhere(err error) string {
	var se *json.SyntaxError
	if errors.As(err, &se) {
		return fmt.Sprintf("invalid JSON at byte %d", se.Offset)
	}
	var te *json.UnmarshalTypeError
	if errors.As(err, &te) {
		return fmt.Sprintf("field %q has the wrong type", te.Field)
	}
	return "invalid JSON"
}

// add parses the entries of a docker config.
func (kc *secretKeychain) add(auths map[string]dockerAuth) error {
	for key, a := range auths {
		host, p := parseRegistryKey(key)
		if host == "" {
			return fmt.Errorf("entry %q names no registry", key)
		}
		cfg := authn.AuthConfig{
			Username:      a.Username,
			Password:      a.Password,
			IdentityToken: a.IdentityToken,
			RegistryToken: a.RegistryToken,
		}
		if a.Auth != "" && cfg.Username == "" && cfg.Password == "" {
			b, err := base64.StdEncoding.DecodeString(a.Auth)
			if err != nil {
				return fmt.Errorf("entry %q: auth is not base64", key)
			}
			u, pw, ok := strings.Cut(string(b), ":")
			if !ok {
				return fmt.Errorf("entry %q: auth is not user:password", key)
			}
			cfg.Username, cfg.Password = u, pw
		}
		kc.creds = append(kc.creds, credential{host: host, path: p, auth: cfg})
	}
	return nil
}

// parseRegistryKey splits a docker config key into a canonical host and a
// repository path prefix.
func parseRegistryKey(key string) (host, repoPath string) {
	k := strings.ToLower(strings.TrimSpace(key))
	k = strings.TrimPrefix(k, "https://")
	k = strings.TrimPrefix(k, "http://")
	host, repoPath, _ = strings.Cut(k, "/")
	repoPath = strings.Trim(repoPath, "/")
	// "index.docker.io/v1/" and friends name the registry, not a path.
	if repoPath == "v1" || repoPath == "v2" {
		repoPath = ""
	}
	return canonicalHost(host), repoPath
}

// canonicalHost folds Docker Hub's names into one.
func canonicalHost(h string) string {
	switch h {
	case "docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com":
		return name.DefaultRegistry
	}
	return h
}

// hostMatches reports whether pattern (labels may be "*") matches host;
// ports must be equal.
func hostMatches(pattern, host string) bool {
	if pattern == host {
		return true
	}
	ph, pp, _ := strings.Cut(pattern, ":")
	hh, hp, _ := strings.Cut(host, ":")
	if pp != hp {
		return false
	}
	pl, hl := strings.Split(ph, "."), strings.Split(hh, ".")
	if len(pl) != len(hl) {
		return false
	}
	for i := range pl {
		if ok, _ := path.Match(pl[i], hl[i]); !ok {
			return false
		}
	}
	return true
}

// Resolve implements authn.Keychain.
func (kc *secretKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	cfg, ok := kc.lookup(r)
	if !ok {
		return authn.Anonymous, nil
	}
	return authn.FromConfig(cfg), nil
}

// lookup returns the credentials of the most specific entry matching r,
// and false if none does.
func (kc *secretKeychain) lookup(r authn.Resource) (authn.AuthConfig, bool) {
	host := canonicalHost(strings.ToLower(r.RegistryStr()))
	repo := ""
	if rr, ok := r.(interface{ RepositoryStr() string }); ok {
		repo = rr.RepositoryStr()
	}
	best, bestScore := -1, -1
	for i, c := range kc.creds {
		if !hostMatches(c.host, host) {
			continue
		}
		if c.path != "" && repo != c.path && !strings.HasPrefix(repo, c.path+"/") {
			continue
		}
		score := len(c.path)*2 + len(c.host)
		if !strings.Contains(c.host, "*") {
			score++
		}
		if score > bestScore {
			best, bestScore = i, score
		}
	}
	if best < 0 {
		return authn.AuthConfig{}, false
	}
	return kc.creds[best].auth, true
}
