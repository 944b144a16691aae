package image

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"regexp"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/google/go-containerregistry/pkg/v1/remote"
)

// Which registries the cache talks to, and how.
//
// A pod names the image, so it names the host the plugin, on the node's
// network, sends requests to. Three rules keep that from reaching what
// only the node should reach:
//
//   - Config.AllowedRegistries, when set, are the only registries images
//     come from (with Config.InsecureRegistries); a redirect (to blob
//     storage) may go elsewhere, under the next rules.
//   - Plain HTTP goes only to Config.InsecureRegistries.
//   - No connection goes to a loopback, link-local (169.254.0.0/16,
//     fe80::/10: cloud metadata services), unspecified or cloud metadata
//     address unless the host dialled is listed in AllowedRegistries or
//     InsecureRegistries. The check runs on the resolved address at dial
//     time (a net.Dialer Control hook), so neither a name resolving to
//     127.0.0.1 nor a redirect escapes it. Proxies from the environment
//     (HTTPS_PROXY, NO_PROXY) are dialled as configured; a request through
//     one is checked by its URL only, the proxy resolving the name.
//
// Refusals are ErrRegistryNotAllowed (PermissionDenied).

// registryPolicy holds the lists of Config that decide which registries
// and addresses the cache may reach.
type registryPolicy struct {
	// allowed and insecure hold normalized "host" and "host:port"
	// entries. Immutable.
	allowed  map[string]bool
	insecure map[string]bool
	// proxies holds the "host:port" of every proxy the environment gave
	// for a request: dialled without the address check.
	proxies sync.Map
}

// normRegistry normalizes a registry entry of Config or a request host:
// lower case, docker.io as go-containerregistry names it.
func normRegistry(s string) string {
	s = strings.ToLower(strings.TrimSuffix(s, "/"))
	if s == "docker.io" {
		return "index.docker.io"
	}
	return s
}

func newRegistryPolicy(allowed, insecure []string) (*registryPolicy, error) {
	p := &registryPolicy{allowed: map[string]bool{}, insecure: map[string]bool{}}
	for _, l := range []struct {
		what string
		in   []string
		out  map[string]bool
	}{{"AllowedRegistries", allowed, p.allowed}, {"InsecureRegistries", insecure, p.insecure}} {
		for _, r := range l.in {
			r = normRegistry(r)
			if u, err := url.Parse("//" + r); r == "" || err != nil || u.Host != r {
				return nil, fmt.Errorf("%w: %s entry %q: want HOST or HOST:PORT", ErrInvalidArgument, l.what, r)
			}
			l.out[r] = true
		}
	}
	return p, nil
}

// inList reports whether hostport is in list, with or without its port.
func inList(list map[string]bool, hostport string) bool {
	hostport = normRegistry(hostport)
	if list[hostport] {
		return true
	}
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		return list[h] || list["["+h+"]"]
	}
	return false
}

// isInsecure reports whether hostport may be spoken to over plain HTTP.
func (p *registryPolicy) isInsecure(hostport string) bool { return inList(p.insecure, hostport) }

// listed reports whether the operator named hostport: it may then be at
// any address.
func (p *registryPolicy) listed(hostport string) bool {
	return inList(p.allowed, hostport) || inList(p.insecure, hostport)
}

// checkRegistry checks the registry of a reference before any request.
func (p *registryPolicy) checkRegistry(hostport string) error {
	if len(p.allowed) > 0 && !p.listed(hostport) {
		return &refusedError{msg: fmt.Sprintf("%s is not one of the registries this node pulls from", hostport)}
	}
	return p.checkHost(hostport)
}

// checkHost refuses, unless the operator listed it, a host that is a
// forbidden address literal or a localhost name.
func (p *registryPolicy) checkHost(hostport string) error {
	if p.listed(hostport) {
		return nil
	}
	host := hostport
	if h, _, err := net.SplitHostPort(hostport); err == nil {
		host = h
	}
	host = strings.ToLower(strings.Trim(host, "[]"))
	if host == "localhost" || strings.HasSuffix(host, ".localhost") {
		return &refusedError{msg: fmt.Sprintf("%s is a loopback name, allowed only for a registry the node's operator lists", safeHost(hostport)), addr: true}
	}
	if ip, err := netip.ParseAddr(host); err == nil {
		return p.checkAddr(hostport, ip)
	}
	return nil
}

// metadataIPv6 is the IPv6 address of AWS's instance metadata service
// (IPv4: 169.254.169.254, link-local).
var metadataIPv6 = netip.MustParseAddr("fd00:ec2::254")

// checkAddr refuses a connection for hostport to ip if ip is a loopback,
// link-local, unspecified or metadata address.
func (p *registryPolicy) checkAddr(hostport string, ip netip.Addr) error {
	ip = ip.Unmap()
	var kind string
	switch {
	case ip.IsLoopback():
		kind = "loopback"
	case ip.IsLinkLocalUnicast(), ip.IsLinkLocalMulticast():
		kind = "link-local"
	case ip.IsUnspecified():
		kind = "unspecified"
	case ip == metadataIPv6:
		kind = "cloud metadata"
	default:
		return nil
	}
	return &refusedError{msg: fmt.Sprintf("%s is at %s address %s, allowed only for a registry the node's operator lists", safeHost(hostport), kind, ip), addr: true}
}

// refusedError is a request the policy refuses.
type refusedError struct {
	msg string
	// addr: refused for the address dialled (not the scheme or the
	// allow-list).
	addr bool
}

func (e *refusedError) Error() string { return ErrRegistryNotAllowed.Error() + ": " + e.msg }
func (e *refusedError) Unwrap() error { return ErrRegistryNotAllowed }

// hostRE matches what safeHost lets into a message.
var hostRE = regexp.MustCompile(`^[A-Za-z0-9._:\[\]-]{1,261}$`)

// safeHost returns hostport for a message if it looks like one (it may
// come from a redirect), or a placeholder.
func safeHost(hostport string) string {
	if hostRE.MatchString(hostport) {
		return hostport
	}
	return "(a host with an invalid name)"
}

// dialContext returns the DialContext of the registry transport: inner
// (nil: a net.Dialer like go-containerregistry's) with the address check.
// Without inner the check runs on every resolved address before the
// connection is attempted (Control); with inner, on the address it
// connected to, before anything is sent.
func (p *registryPolicy) dialContext(inner func(ctx context.Context, network, addr string) (net.Conn, error)) func(ctx context.Context, network, addr string) (net.Conn, error) {
	base := net.Dialer{Timeout: 30 * time.Second, KeepAlive: 30 * time.Second}
	return func(ctx context.Context, network, addr string) (net.Conn, error) {
		_, isProxy := p.proxies.Load(addr)
		exempt := isProxy || p.listed(addr)
		if inner != nil {
			conn, err := inner(ctx, network, addr)
			if err != nil || exempt {
				return conn, err
			}
			if ap, perr := netip.ParseAddrPort(conn.RemoteAddr().String()); perr == nil {
				if err := p.checkAddr(addr, ap.Addr()); err != nil {
					conn.Close()
					return nil, err
				}
			}
			return conn, nil
		}
		d := base
		if !exempt {
			d.Control = func(_, address string, _ syscall.RawConn) error {
				ap, err := netip.ParseAddrPort(address)
				if err != nil {
					return &refusedError{msg: fmt.Sprintf("%s resolved to an address that is not an IP address", safeHost(addr)), addr: true}
				}
				return p.checkAddr(addr, ap.Addr())
			}
		}
		return d.DialContext(ctx, network, addr)
	}
}

// proxyFunc wraps a Transport's Proxy to remember the proxies it gives,
// so that they are dialled as configured.
func (p *registryPolicy) proxyFunc(next func(*http.Request) (*url.URL, error)) func(*http.Request) (*url.URL, error) {
	return func(req *http.Request) (*url.URL, error) {
		u, err := next(req)
		if u != nil {
			host := u.Host
			if u.Port() == "" {
				port := map[string]string{"http": "80", "https": "443", "socks5": "1080", "socks5h": "1080"}[u.Scheme]
				host = net.JoinHostPort(u.Hostname(), port)
			}
			p.proxies.Store(host, true)
		}
		return u, err
	}
}

// guardTransport refuses, before anything is sent, plain-HTTP requests to
// hosts not listed as insecure (whatever go-containerregistry's scheme
// fallback, which also tries HTTP for RFC 1918 and loopback hosts, or a
// redirect asks for), and requests to forbidden address literals (which a
// proxy would otherwise dial for us).
type guardTransport struct {
	next   http.RoundTripper
	policy *registryPolicy
}

func (g *guardTransport) RoundTrip(req *http.Request) (*http.Response, error) {
	err := g.policy.checkHost(req.URL.Host)
	if err == nil && req.URL.Scheme != "https" && !g.policy.isInsecure(req.URL.Host) {
		err = &refusedError{msg: fmt.Sprintf("plain HTTP to %s refused: it is not listed as an insecure registry", safeHost(req.URL.Host))}
	}
	if err != nil {
		if req.Body != nil {
			req.Body.Close()
		}
		return nil, err
	}
	return g.next.RoundTrip(req)
}

// newTransport builds the registry transport of cfg: cfg.Transport (nil:
// a clone of go-containerregistry's default) with the policy's dialer,
// proxies and CA bundle, behind guardTransport. A Transport that is not
// an *http.Transport gets the request checks only.
func newTransport(cfg *Config, p *registryPolicy) (http.RoundTripper, error) {
	var t *http.Transport
	switch ct := cfg.Transport.(type) {
	case nil:
		t = remote.DefaultTransport.(*http.Transport).Clone()
		t.ResponseHeaderTimeout = time.Minute
		t.DialContext = nil
	case *http.Transport:
		t = ct.Clone()
	default:
		return &guardTransport{next: ct, policy: p}, nil
	}
	t.DialContext = p.dialContext(t.DialContext)
	if t.Proxy != nil {
		t.Proxy = p.proxyFunc(t.Proxy)
	}
	if cfg.CAFile != "" {
		pool, err := caPool(cfg.CAFile)
		if err != nil {
			return nil, err
		}
		if t.TLSClientConfig == nil {
			t.TLSClientConfig = &tls.Config{}
		}
		t.TLSClientConfig.RootCAs = pool
	}
	return &guardTransport{next: t, policy: p}, nil
}

// caPool returns the system's roots (or the fallback roots a program
// registered, when the system has none) plus the certificates of the PEM
// file path.
func caPool(path string) (*x509.CertPool, error) {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil, fmt.Errorf("%w: CA bundle: %w", ErrInvalidArgument, err)
	}
	pool, err := x509.SystemCertPool()
	if err != nil || pool == nil {
		pool = x509.NewCertPool()
	}
	if !pool.AppendCertsFromPEM(b) {
		return nil, fmt.Errorf("%w: CA bundle %s holds no PEM certificate", ErrInvalidArgument, path)
	}
	return pool, nil
}
