package image

import (
	"fmt"
	"net/url"
	"strings"

	"github.com/google/go-containerregistry/pkg/name"
)

// Registry mirrors.
//
// Config.Mirrors gives registries an ordered list of mirrors, as
// containerd's hosts.toml and CRI-O's registries.conf do: a registry
// image's manifest is asked of each mirror in turn, then of the registry
// itself, the first that answers serving the pull; a mirror that fails
// (any error: unreachable, refused, not found, unauthorized) is logged and
// the next is tried. The repository path is the same on a mirror
// (docker.io/library/busybox is MIRROR/library/busybox). The manifest
// fetched by digest and every blob are verified as from the registry; a
// mirror that fails after the manifest, while sending layers, fails the
// pull (a retry starts again with the mirrors). Mirrors are registries
// to the policy (transport.go): NewCache refuses one the allow-list does
// not list, or one named by a loopback address or name that is not in
// InsecureRegistries or AllowedRegistries, and every connection is
// checked as any other. A mirror gets the credentials the sources hold
// for its own host (see nodecreds.go), never the registry's.

// newMirrors normalizes and checks Config.Mirrors.
func newMirrors(in map[string][]string, p *registryPolicy) (map[string][]string, error) {
	out := map[string][]string{}
	for reg, ms := range in {
		r := normRegistry(reg)
		if u, err := url.Parse("//" + r); r == "" || err != nil || u.Host != r {
			return nil, fmt.Errorf("%w: Mirrors: registry %q: want HOST or HOST:PORT", ErrInvalidArgument, reg)
		}
		for _, m := range ms {
			m = normRegistry(m)
			if u, err := url.Parse("//" + m); m == "" || err != nil || u.Host != m {
				return nil, fmt.Errorf("%w: Mirrors: mirror %q of %s: want HOST or HOST:PORT", ErrInvalidArgument, m, reg)
			}
			if m == r {
				return nil, fmt.Errorf("%w: Mirrors: %s is its own mirror", ErrInvalidArgument, reg)
			}
			if err := p.checkRegistry(m); err != nil {
				return nil, fmt.Errorf("%w: Mirrors: mirror %s of %s: %v", ErrInvalidArgument, m, reg, err)
			}
			out[r] = append(out[r], m)
		}
	}
	return out, nil
}

// mirrorRefs returns r on each mirror of its registry, in order.
func (c *Cache) mirrorRefs(r name.Reference) []name.Reference {
	var out []name.Reference
	for _, m := range c.mirrors[normRegistry(r.Context().RegistryStr())] {
		var opts []name.Option
		if c.policy.isInsecure(m) {
			opts = append(opts, name.Insecure)
		}
		reg, err := name.NewRegistry(m, opts...)
		if err != nil {
			continue
		}
		repo := reg.Repo(strings.Split(r.Context().RepositoryStr(), "/")...)
		switch t := r.(type) {
		case name.Digest:
			out = append(out, repo.Digest(t.DigestStr()))
		case name.Tag:
			out = append(out, repo.Tag(t.TagStr()))
		}
	}
	return out
}

// mirrorFailed logs that the mirror ref of s failed with err (classified:
// no server text, no credential).
func (c *Cache) mirrorFailed(s *source, ref name.Reference, err error) {
	c.cfg.Logger.Info("Registry mirror failed; trying the next source", "image", s.key, "mirror", ref.Context().RegistryStr(), "err", err)
}
