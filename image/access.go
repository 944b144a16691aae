package image

import (
	"crypto/hmac"
	"crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"

	"github.com/google/go-containerregistry/pkg/authn"
)

// Access to cached registry images.
//
// A registry image in the cache was fetched with somebody's credentials,
// or with none. A later Get must not hand it to a caller that could not
// have fetched it itself (a pod without the pull secret of another team's
// private image), so the cache remembers, per manifest digest, whether
// anonymous access was verified at the source and which credentials were.
// A Get whose caller matches neither re-checks at the source (IfNotPresent,
// one manifest request, as Always does) or is refused (Never, which may not
// ask the source). Credentials are remembered only as fingerprints: a
// keyed hash under a key made per process, so nothing secret is stored and
// the grants are forgotten by a restart (until then, the first Get after
// it re-checks). Local images (LocalPrefix) need no credentials.

// access is what the cache verified about who may use one image.
type access struct {
	// public: the source served the image without credentials.
	public bool
	// grants are fingerprints of credentials the source accepted for it.
	grants map[string]bool
}

// fingerprint identifies the credentials kc gives for s's registry; ""
// means anonymous.
func (c *Cache) fingerprint(s *source, kc authn.Keychain) string {
	if s.remote == nil || kc == nil {
		return ""
	}
	auth, err := kc.Resolve(s.remote.Context())
	if err != nil || auth == nil || auth == authn.Anonymous {
		return ""
	}
	cfg, err := auth.Authorization()
	if err != nil || cfg == nil || *cfg == (authn.AuthConfig{}) {
		return ""
	}
	b, _ := json.Marshal(struct {
		Registry string
		Auth     *authn.AuthConfig
	}{s.remote.Context().RegistryStr(), cfg})
	mac := hmac.New(sha256.New, c.accessKey[:])
	mac.Write(b)
	return hex.EncodeToString(mac.Sum(nil))
}

// newAccessKey makes the per-process key of fingerprints.
func newAccessKey() (k [32]byte) {
	rand.Read(k[:])
	return k
}

// mayUse says whether the caller with credentials fp may use the cached
// image digest of s without asking the source.
func (c *Cache) mayUse(s *source, digest, fp string) bool {
	if s.remote == nil {
		return true
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.access[digest]
	return a != nil && (a.public || a.grants[fp])
}

// grant records that the source gave the image digest to the caller with
// credentials fp.
func (c *Cache) grant(s *source, digest, fp string) {
	if s.remote == nil {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	a := c.access[digest]
	if a == nil {
		a = &access{grants: map[string]bool{}}
		c.access[digest] = a
	}
	if fp == "" {
		a.public = true
	} else {
		a.grants[fp] = true
	}
}
