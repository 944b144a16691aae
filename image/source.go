package image

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"regexp"
	"strings"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
	"github.com/google/go-containerregistry/pkg/v1/types"
)

// source is a parsed image reference: a registry reference, or a name
// under the local image directory.
type source struct {
	// key is the reference as the cache indexes it: the normalized
	// registry reference (index.docker.io/library/busybox:latest) or the
	// reference as given for local images.
	key string
	// remote is set for registry images.
	remote name.Reference
	// local is the path of a local OCI layout directory or tarball, with
	// localTag and localDigest selecting an image inside it.
	local       string
	localTag    string
	localDigest string
	// digest is the manifest (or index) digest the reference pins, if any.
	digest string
	// mirrors are remote on the mirrors of its registry, tried in order
	// before it (Config.Mirrors).
	mirrors []name.Reference
}

// safeMediaType quotes a media type from a registry for a message if it
// is one go-containerregistry knows: nothing else a registry sends
// reaches an error.
func safeMediaType(mt types.MediaType) string {
	if mt.IsImage() || mt.IsIndex() || mt.IsSchema1() || mt.IsLayer() || mt.IsConfig() {
		return fmt.Sprintf("%q", mt)
	}
	return "(not a known media type)"
}

// localName is one path element of a local image name.
var localName = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9._-]*$`)

// parseRef parses ref for this cache.
func (c *Cache) parseRef(ref string) (*source, error) {
	if ref == "" || len(ref) > 4096 {
		return nil, fmt.Errorf("%w %q", ErrInvalidReference, ref)
	}
	if c.cfg.LocalPrefix != "" && strings.HasPrefix(ref, c.cfg.LocalPrefix) {
		return c.parseLocal(ref)
	}
	r, err := name.ParseReference(ref)
	if err != nil {
		return nil, fmt.Errorf("%w %q: %v", ErrInvalidReference, ref, err)
	}
	if err := c.policy.checkRegistry(r.Context().RegistryStr()); err != nil {
		return nil, fmt.Errorf("%q: %w", ref, err)
	}
	if c.policy.isInsecure(r.Context().RegistryStr()) {
		if r, err = name.ParseReference(ref, name.Insecure); err != nil {
			return nil, fmt.Errorf("%w %q: %v", ErrInvalidReference, ref, err)
		}
	}
	s := &source{key: r.Name(), remote: r, mirrors: c.mirrorRefs(r)}
	if d, ok := r.(name.Digest); ok {
		s.digest = d.DigestStr()
	}
	return s, nil
}

// parseLocal parses PREFIX NAME[:TAG|@DIGEST], NAME being slash-separated
// elements of localName under Config.LocalDir.
func (c *Cache) parseLocal(ref string) (*source, error) {
	if c.cfg.LocalDir == "" {
		return nil, fmt.Errorf("%w %q: no local image directory is configured", ErrInvalidReference, ref)
	}
	rest := strings.TrimPrefix(ref, c.cfg.LocalPrefix)
	s := &source{key: ref}
	if i := strings.Index(rest, "@"); i >= 0 {
		h, err := v1.NewHash(rest[i+1:])
		if err != nil {
			return nil, fmt.Errorf("%w %q: bad digest", ErrInvalidReference, ref)
		}
		s.localDigest, s.digest, rest = h.String(), h.String(), rest[:i]
	} else if i := strings.LastIndex(rest, ":"); i >= 0 && !strings.Contains(rest[i:], "/") {
		s.localTag, rest = rest[i+1:], rest[:i]
		if s.localTag == "" {
			return nil, fmt.Errorf("%w %q: empty tag", ErrInvalidReference, ref)
		}
	}
	for _, el := range strings.Split(rest, "/") {
		if !localName.MatchString(el) {
			return nil, fmt.Errorf("%w %q: a local image is named by [A-Za-z0-9._-] path elements under %s", ErrInvalidReference, ref, c.cfg.LocalPrefix)
		}
	}
	s.local = filepath.Join(c.cfg.LocalDir, filepath.FromSlash(rest))
	return s, nil
}

// resolved is an image chosen for a reference: its manifest digest and a
// go-containerregistry image to read layers from.
type resolved struct {
	digest v1.Hash
	img    v1.Image
	// from is the reference the manifest came from: the image's, or one
	// of its mirrors'. Nil for local images.
	from name.Reference
	// layersCompressed says to read layers through Compressed() (and
	// decompress ourselves); false means Uncompressed() (tarballs, whose
	// layers may be stored uncompressed).
	layersCompressed bool
}

// remoteOptions returns the go-containerregistry options for one request.
func (c *Cache) remoteOptions(ctx context.Context, kc authn.Keychain) []remote.Option {
	if kc == nil {
		kc = anonymousKeychain{}
	}
	return []remote.Option{
		remote.WithContext(ctx),
		remote.WithAuthFromKeychain(kc),
		remote.WithTransport(c.transport),
		remote.WithPlatform(c.platform),
		remote.WithUserAgent("csi-memfs"),
		remote.WithRetryBackoff(c.retry),
	}
}

// resolve finds the image ref names for this node's platform. For a
// registry it fetches the manifest (and index) with kc's credentials.
func (c *Cache) resolve(ctx context.Context, s *source, kc authn.Keychain) (*resolved, error) {
	if s.remote == nil {
		return c.resolveLocal(s)
	}
	for _, m := range s.mirrors {
		r, err := c.resolveFrom(ctx, s, m, kc)
		if err == nil || ctx.Err() != nil {
			return r, err
		}
		c.mirrorFailed(s, m, err)
	}
	return c.resolveFrom(ctx, s, s.remote, kc)
}

// resolveFrom resolves the registry image s at ref, s.remote or one of
// its mirrors.
func (c *Cache) resolveFrom(ctx context.Context, s *source, ref name.Reference, kc authn.Keychain) (*resolved, error) {
	desc, err := remote.Get(ref, c.remoteOptions(ctx, kc)...)
	if err != nil {
		return nil, classifyRemote(s.key, err)
	}
	var img v1.Image
	switch {
	case desc.MediaType.IsIndex():
		idx, err := desc.ImageIndex()
		if err != nil {
			return nil, classifyRemote(s.key, err)
		}
		img, err = c.pickPlatform(s.key, idx)
		if err != nil {
			return nil, err
		}
	case desc.MediaType.IsImage():
		if img, err = desc.Image(); err != nil {
			return nil, classifyRemote(s.key, err)
		}
	default:
		return nil, fmt.Errorf("%w: %s: media type %s is not an image", ErrNotFound, s.key, safeMediaType(desc.MediaType))
	}
	d, err := img.Digest()
	if err != nil {
		return nil, classifyRemote(s.key, err)
	}
	return &resolved{digest: d, img: img, from: ref, layersCompressed: true}, nil
}

// pickPlatform returns the image of idx (recursing into nested indexes)
// for this node's platform.
func (c *Cache) pickPlatform(ref string, idx v1.ImageIndex) (v1.Image, error) {
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, classifyRemote(ref, err)
	}
	for _, m := range im.Manifests {
		switch {
		case m.MediaType.IsImage():
			if m.Platform != nil && m.Platform.Satisfies(c.platform) {
				img, err := idx.Image(m.Digest)
				return img, classifyRemote(ref, err)
			}
		case m.MediaType.IsIndex():
			if m.Platform == nil || m.Platform.Satisfies(c.platform) {
				child, err := idx.ImageIndex(m.Digest)
				if err != nil {
					return nil, classifyRemote(ref, err)
				}
				if img, err := c.pickPlatform(ref, child); err == nil {
					return img, nil
				}
			}
		}
	}
	return nil, fmt.Errorf("%w: %s: no image for platform %s in the index", ErrNotFound, ref, c.platform.String())
}

// resolveLocal opens an OCI layout directory or image tarball.
func (c *Cache) resolveLocal(s *source) (*resolved, error) {
	fi, err := os.Stat(s.local)
	if errors.Is(err, fs.ErrNotExist) {
		if fi2, err2 := os.Stat(s.local + ".tar"); err2 == nil && fi2.Mode().IsRegular() {
			fi, err, s.local = fi2, nil, s.local+".tar"
		}
	}
	if errors.Is(err, fs.ErrNotExist) {
		return nil, fmt.Errorf("%w: %s: no such local image", ErrNotFound, s.key)
	}
	if err != nil {
		return nil, err
	}
	if fi.Mode().IsRegular() {
		if s.localTag != "" || s.localDigest != "" {
			return nil, fmt.Errorf("%w %q: an image tarball holds one image: name it without tag or digest", ErrInvalidReference, s.key)
		}
		img, err := tarball.ImageFromPath(s.local, nil)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, s.key, err)
		}
		d, err := img.Digest()
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, s.key, err)
		}
		return &resolved{digest: d, img: img}, nil
	}
	idx, err := layout.ImageIndexFromPath(s.local)
	if err != nil {
		return nil, fmt.Errorf("%w: %s: not an OCI image layout: %w", ErrNotFound, s.key, err)
	}
	im, err := idx.IndexManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, s.key, err)
	}
	var pick []v1.Descriptor
	for _, m := range im.Manifests {
		switch {
		case s.localDigest != "":
			if m.Digest.String() == s.localDigest {
				pick = append(pick, m)
			}
		case s.localTag != "":
			if n := m.Annotations["org.opencontainers.image.ref.name"]; n == s.localTag || strings.HasSuffix(n, ":"+s.localTag) {
				pick = append(pick, m)
			}
		default:
			pick = append(pick, m)
		}
	}
	if len(pick) == 0 {
		return nil, fmt.Errorf("%w: %s: not in the layout", ErrNotFound, s.key)
	}
	if len(pick) > 1 {
		return nil, fmt.Errorf("%w %q: the layout holds %d images: name one with :TAG or @DIGEST", ErrInvalidReference, s.key, len(pick))
	}
	var img v1.Image
	switch m := pick[0]; {
	case m.MediaType.IsIndex():
		child, err := idx.ImageIndex(m.Digest)
		if err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, s.key, err)
		}
		if img, err = c.pickPlatform(s.key, child); err != nil {
			return nil, err
		}
	case m.MediaType.IsImage() || m.MediaType == types.MediaType(""):
		if img, err = idx.Image(m.Digest); err != nil {
			return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, s.key, err)
		}
	default:
		return nil, fmt.Errorf("%w: %s: media type %s is not an image", ErrNotFound, s.key, safeMediaType(m.MediaType))
	}
	// A layout's blobs are plain files: check the manifest against the
	// digest that names it.
	raw, err := img.RawManifest()
	if err != nil {
		return nil, fmt.Errorf("%w: %s: %w", ErrCorrupt, s.key, err)
	}
	sum := sha256.Sum256(raw)
	d, err := img.Digest()
	if err != nil || d.Algorithm != "sha256" || d.Hex != hex.EncodeToString(sum[:]) {
		return nil, fmt.Errorf("%w: %s: manifest does not match its digest", ErrCorrupt, s.key)
	}
	return &resolved{digest: d, img: img, layersCompressed: true}, nil
}

// anonymousKeychain resolves every registry to anonymous access. It stands
// in for a nil Keychain: the node's own docker config is never used.
type anonymousKeychain struct{}

func (anonymousKeychain) Resolve(authn.Resource) (authn.Authenticator, error) {
	return authn.Anonymous, nil
}
