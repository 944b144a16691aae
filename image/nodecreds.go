package image

import (
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
)

// The node's credentials.
//
// As kubelet does for a pod's containers, a registry request is sent with
// the first of these that has credentials for it:
//
//  1. the volume's pull secret (nodePublishSecretRef), the Keychain given
//     to Get;
//  2. the node's docker config (Config.NodeDockerConfigs);
//  3. the credential provider plugins (Config.CredentialProviderConfig),
//     in the order of the config file;
//
// and with none (anonymous) if none has. kubelet puts the same sources in
// one keyring, pod secrets first, the node's docker config and the
// plugins after; it tries every matching credential in turn, where this
// package takes the first. Mirrors (Config.Mirrors) get the credentials
// the sources hold for the mirror's host, never those of the upstream
// registry.

// maxNodeConfigSize bounds a node docker config file.
const maxNodeConfigSize = 1 << 20

// nodeConfigKeychain reads the first existing file of a search list of
// docker configs (config.json {"auths": {...}} or legacy .dockercfg), as
// kubelet reads /var/lib/kubelet/config.json, ~/.docker/config.json and
// .dockercfg. The file is read again when its size or mtime changes.
type nodeConfigKeychain struct {
	// paths is the search list. Immutable.
	paths []string
	// log gets read and parse failures (no file content). Immutable.
	log logr.Logger

	// mu protects the fields below.
	mu sync.Mutex
	// path, size and mtime identify what kc was read from; kc is nil if
	// no file exists or the one found is malformed.
	path  string
	size  int64
	mtime time.Time
	kc    *secretKeychain
	// checked is when the files were last looked at; they are looked at
	// again after a second at the earliest.
	checked time.Time
}

func newNodeConfigKeychain(paths []string, log logr.Logger) (*nodeConfigKeychain, error) {
	for _, p := range paths {
		if !filepath.IsAbs(p) {
			return nil, fmt.Errorf("%w: node docker config %q is not an absolute path", ErrInvalidArgument, p)
		}
	}
	n := &nodeConfigKeychain{paths: paths, log: log}
	n.mu.Lock()
	n.refreshLocked(true)
	n.mu.Unlock()
	return n, nil
}

// lookup returns the node's credentials for r.
func (n *nodeConfigKeychain) lookup(r authn.Resource) (authn.AuthConfig, bool) {
	n.mu.Lock()
	n.refreshLocked(false)
	kc := n.kc
	n.mu.Unlock()
	if kc == nil {
		return authn.AuthConfig{}, false
	}
	return kc.lookup(r)
}

// refreshLocked reads the first existing file of the search list if it
// changed since the last read.
//
// Preconditions:
//   - n.mu is locked.
func (n *nodeConfigKeychain) refreshLocked(force bool) {
	now := time.Now()
	if !force && now.Sub(n.checked) < time.Second {
		return
	}
	n.checked = now
	for _, p := range n.paths {
		fi, err := os.Stat(p)
		if errors.Is(err, fs.ErrNotExist) {
			continue
		}
		if err == nil && !fi.Mode().IsRegular() {
			err = errors.New("not a regular file")
		}
		if err == nil && fi.Size() > maxNodeConfigSize {
			err = fmt.Errorf("larger than %d bytes", maxNodeConfigSize)
		}
		if err != nil {
			n.failLocked(p, err)
			return
		}
		if p == n.path && fi.Size() == n.size && fi.ModTime().Equal(n.mtime) {
			return
		}
		b, err := os.ReadFile(p)
		if err != nil {
			n.failLocked(p, err)
			return
		}
		kc, err := parseDockerConfig(b)
		n.path, n.size, n.mtime, n.kc = p, fi.Size(), fi.ModTime(), kc
		if err != nil {
			n.log.Info("Node docker config is malformed; using none", "path", p, "err", err)
		}
		return
	}
	n.path, n.kc = "", nil
}

func (n *nodeConfigKeychain) failLocked(p string, err error) {
	if n.path != p || n.kc != nil {
		n.log.Info("Cannot read the node docker config; using none", "path", p, "err", err)
	}
	n.path, n.size, n.mtime, n.kc = p, -1, time.Time{}, nil
}

// parseDockerConfig parses a docker config.json ({"auths": {...}}) or a
// legacy .dockercfg ({"registry": {...}}). credsStore and credHelpers are
// ignored. Errors never quote the content.
func parseDockerConfig(b []byte) (*secretKeychain, error) {
	var top map[string]json.RawMessage
	if err := json.Unmarshal(b, &top); err != nil {
		return nil, fmt.Errorf("%w: not a docker config (%s)", ErrInvalidArgument, jsonErrorWhere(err))
	}
	var auths map[string]dockerAuth
	raw, isConfigJSON := top["auths"]
	if !isConfigJSON {
		raw = b
	}
	if err := json.Unmarshal(raw, &auths); err != nil {
		return nil, fmt.Errorf("%w: not a docker config (%s)", ErrInvalidArgument, jsonErrorWhere(err))
	}
	kc := &secretKeychain{}
	if err := kc.add(auths); err != nil {
		return nil, fmt.Errorf("%w: %v", ErrInvalidArgument, err)
	}
	return kc, nil
}

// credentialLookup is a source of the node's credentials: it returns the
// credentials it has for the resource r of the image ref, and false if it
// has none.
type credentialLookup interface {
	lookup(image string, r authn.Resource) (authn.AuthConfig, bool)
}

// nodeLookup adapts a nodeConfigKeychain to credentialLookup.
type nodeLookup struct{ n *nodeConfigKeychain }

func (l nodeLookup) lookup(_ string, r authn.Resource) (authn.AuthConfig, bool) { return l.n.lookup(r) }

// chainKeychain is the keychain of one Get: the volume's own keychain
// first, then the node's sources in order (see the top of this file).
type chainKeychain struct {
	// pod is the Keychain given to Get (nil: none).
	pod authn.Keychain
	// node are the node's sources, in order.
	node []credentialLookup
	// refs are the references (the image and its mirrors) whose
	// repositories requests go to: a source is asked about the image by
	// its full reference.
	refs []name.Reference
}

// Resolve implements authn.Keychain.
func (kc *chainKeychain) Resolve(r authn.Resource) (authn.Authenticator, error) {
	if kc.pod != nil {
		a, err := kc.pod.Resolve(r)
		if err != nil {
			return nil, err
		}
		if a != nil && a != authn.Anonymous {
			return a, nil
		}
	}
	image := kc.imageOf(r)
	for _, src := range kc.node {
		if cfg, ok := src.lookup(image, r); ok {
			return authn.FromConfig(cfg), nil
		}
	}
	return authn.Anonymous, nil
}

// imageOf names the image a request for r is about, as kubelet names it
// to credential providers: the full reference, Docker Hub as docker.io.
func (kc *chainKeychain) imageOf(r authn.Resource) string {
	s := r.String()
	if repo, ok := r.(name.Repository); ok {
		for _, ref := range kc.refs {
			if ref.Context().Name() == repo.Name() {
				s = ref.Name()
				break
			}
		}
	}
	if rest, ok := strings.CutPrefix(s, name.DefaultRegistry+"/"); ok {
		return "docker.io/" + rest
	}
	return s
}

// keychain returns the keychain of a Get of the registry image s whose
// volume gave kc (nil: none).
func (c *Cache) keychain(s *source, kc authn.Keychain) authn.Keychain {
	if len(c.nodeCreds) == 0 {
		return kc
	}
	return &chainKeychain{pod: kc, node: c.nodeCreds, refs: append([]name.Reference{s.remote}, s.mirrors...)}
}
