package image

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"strings"
	"syscall"

	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
)

// Sentinel errors. Every error returned by Get, Open and
// KeychainFromSecrets wraps at most one of them (test with errors.Is); the
// driver maps them to gRPC codes as the comment on each says. An error that
// wraps none of them is an internal failure (Internal). A Get abandoned by
// its caller returns the context's error instead.
var (
	// ErrInvalidArgument: the caller's input is malformed (a reference, a
	// pull policy, a pull secret). InvalidArgument.
	ErrInvalidArgument = errors.New("invalid argument")
	// ErrInvalidReference: the image reference does not parse, or names a
	// local image outside the configured directory. It also matches
	// ErrInvalidArgument. InvalidArgument.
	ErrInvalidReference = fmt.Errorf("%w: invalid image reference", ErrInvalidArgument)
	// ErrNotFound: the repository, tag, digest or local image does not
	// exist, the index has no image for this node's platform, or the policy
	// is Never and the image is not cached. NotFound.
	ErrNotFound = errors.New("image not found")
	// ErrUnauthorized: the registry refused the credentials (or their
	// absence). The message never contains a credential. PermissionDenied.
	ErrUnauthorized = errors.New("registry refused access")
	// ErrUnavailable: the registry could not be reached (TLS failures
	// included), failed (5xx, 429), broke off a transfer or stalled.
	// Unavailable.
	ErrUnavailable = errors.New("registry unavailable")
	// ErrCorrupt: image content does not match its digest or does not
	// decode (bad gzip/zstd/tar). Nothing of it is kept. Unavailable or
	// DataLoss; a retry pulls again from scratch.
	ErrCorrupt = errors.New("image content corrupt")
	// ErrUnsafe: the image is intact but holds something the cache refuses
	// to unpack: a path with "..", an absolute path, a path through a
	// symlink, a hard link out of the tree. FailedPrecondition.
	ErrUnsafe = errors.New("image content unsafe")
	// ErrCacheFull: the image is larger than the cache budget, or the disk
	// under the cache is full; ErrTooLarge says which limit flattening
	// passed. ResourceExhausted.
	ErrCacheFull = errors.New("image cache full")
	// ErrClosed: the Cache has been closed. Unavailable.
	ErrClosed = errors.New("image cache closed")

	// ErrRegistryNotAllowed: the node's policy refuses the registry: it is
	// not in Config.AllowedRegistries, it would need plain HTTP and is not
	// in Config.InsecureRegistries, or it (or a redirect) resolves to a
	// loopback, link-local or unspecified address and the operator did not
	// list it. It also matches ErrUnauthorized. PermissionDenied.
	ErrRegistryNotAllowed error = &subError{msg: "image registry not allowed on this node", parent: ErrUnauthorized}
	// ErrTooLarge: flattening the image passed a limit: its uncompressed
	// bytes the cache budget or the disk's free space (less
	// Config.DiskReserve), its entries Config.MaxFiles, or a path
	// Config.MaxPathLength. It also matches ErrCacheFull.
	// ResourceExhausted.
	ErrTooLarge error = &subError{msg: "image too large", parent: ErrCacheFull}
)

// subError is a sentinel that also matches a broader one, with a message
// of its own.
type subError struct {
	msg    string
	parent error
}

func (e *subError) Error() string        { return e.msg }
func (e *subError) Is(target error) bool { return target == e.parent }

// Messages of errors from registries.
//
// A pod names the registry, and kubelet copies a failed publish's message
// into the pod's events: no text a remote server chose may reach an
// error. go-containerregistry's transport.Error prints the registry's
// error messages or, failing those, the response body; TLS, DNS and JSON
// errors quote names and bytes the server sent. So classifyRemote builds
// every message from what it knows: the HTTP status, the registry's error
// codes when they are codes of the distribution spec, the kind of network
// or TLS failure. The error it returns does not unwrap to the original.

// knownCodes are the error codes of the OCI distribution spec (and
// Docker's TOOMANYREQUESTS, UNAVAILABLE): the only text of a registry's
// error response a message may carry.
var knownCodes = map[transport.ErrorCode]bool{}

func init() {
	for _, c := range []transport.ErrorCode{transport.BlobUnknownErrorCode, transport.BlobUploadInvalidErrorCode,
		transport.BlobUploadUnknownErrorCode, transport.DigestInvalidErrorCode, transport.ManifestBlobUnknownErrorCode,
		transport.ManifestInvalidErrorCode, transport.ManifestUnknownErrorCode, transport.ManifestUnverifiedErrorCode,
		transport.NameInvalidErrorCode, transport.NameUnknownErrorCode, transport.SizeInvalidErrorCode,
		transport.TagInvalidErrorCode, transport.UnauthorizedErrorCode, transport.DeniedErrorCode,
		transport.UnsupportedErrorCode, transport.TooManyRequestsErrorCode, transport.UnknownErrorCode,
		transport.UnavailableErrorCode} {
		knownCodes[c] = true
	}
}

// remoteError is an error from talking to a registry, with a message made
// only of what classifyRemote knows to be safe.
type remoteError struct{ msg string }

func (e *remoteError) Error() string { return e.msg }

// classifyRemote returns an error for err, returned by go-containerregistry
// while talking to a registry about ref: the sentinel that says what went
// wrong and a message with no text from the server. Context errors stay
// context errors.
func classifyRemote(ref string, err error) error {
	if err == nil {
		return nil
	}
	var re *refusedError
	switch {
	case errors.Is(err, context.Canceled):
		return fmt.Errorf("%s: %w", ref, context.Canceled)
	case errors.Is(err, context.DeadlineExceeded):
		return fmt.Errorf("%s: %w", ref, context.DeadlineExceeded)
	case errors.As(err, &re) && re.addr:
		// Before the rest: go-containerregistry's scheme fallback also
		// tried plain HTTP, refused too.
		return fmt.Errorf("%s: %w", ref, re)
	}
	if msg := describeTLS(err); msg != "" {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, ref, &remoteError{msg})
	}
	if errors.As(err, &re) {
		// Plain HTTP refused (the scheme fallback's, when HTTPS failed
		// for a reason other than TLS too) or the allow-list.
		return fmt.Errorf("%s: %w", ref, re)
	}
	var te *transport.Error
	if errors.As(err, &te) {
		sentinel := ErrUnavailable
		for _, d := range te.Errors {
			switch d.Code {
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				sentinel = ErrUnauthorized
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				sentinel = ErrNotFound
			}
		}
		if sentinel == ErrUnavailable {
			switch {
			case te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden:
				sentinel = ErrUnauthorized
			case te.StatusCode == http.StatusNotFound:
				sentinel = ErrNotFound
			case te.StatusCode == http.StatusTooManyRequests || te.StatusCode >= 500:
			default:
				sentinel = nil
			}
		}
		msg := &remoteError{describeStatus(te)}
		if sentinel == nil {
			return fmt.Errorf("%s: %w", ref, msg)
		}
		return fmt.Errorf("%w: %s: %w", sentinel, ref, msg)
	}
	var ue *url.Error
	if errors.As(err, &ue) && redirectRefused(ue) {
		return fmt.Errorf("%s: %w", ref, &refusedError{msg: "a redirect to a private, loopback or link-local address was refused"})
	}
	if isNetworkError(err) {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, ref, &remoteError{describeNet(err)})
	}
	if hasSentinel(err) && ue == nil {
		// Ours, made without server text.
		return err
	}
	var se *json.SyntaxError
	var jte *json.UnmarshalTypeError
	if errors.As(err, &se) || errors.As(err, &jte) {
		return fmt.Errorf("%w: %s: %w", ErrCorrupt, ref, &remoteError{"malformed JSON in the registry's response"})
	}
	return fmt.Errorf("%s: %w", ref, &remoteError{"the registry's response could not be used"})
}

// redirectRefused reports whether ue is go-containerregistry's refusal
// of a redirect to a private or link-local address literal (its SSRF
// check, which runs before ours): a request to such a literal that failed
// with no network or TLS error.
func redirectRefused(ue *url.Error) bool {
	u, err := url.Parse(ue.URL)
	if err != nil {
		return false
	}
	ip, err := netip.ParseAddr(u.Hostname())
	if err != nil {
		return false
	}
	ip = ip.Unmap()
	if !ip.IsPrivate() && !ip.IsLoopback() && !ip.IsLinkLocalUnicast() && !ip.IsUnspecified() {
		return false
	}
	var oe *net.OpError
	return !errors.As(ue.Err, &oe) && describeTLS(ue.Err) == "" && !errors.Is(ue.Err, io.EOF) && !errors.Is(ue.Err, io.ErrUnexpectedEOF)
}

// describeStatus describes an HTTP error response: status and known
// error codes.
func describeStatus(te *transport.Error) string {
	msg := fmt.Sprintf("HTTP status %d %s", te.StatusCode, http.StatusText(te.StatusCode))
	var codes []string
	seen := map[transport.ErrorCode]bool{}
	for _, d := range te.Errors {
		if knownCodes[d.Code] && !seen[d.Code] {
			seen[d.Code] = true
			codes = append(codes, string(d.Code))
		}
	}
	if len(codes) > 0 {
		msg += " (registry error " + strings.Join(codes, ", ") + ")"
	}
	return msg
}

// describeTLS describes a TLS failure, or returns "".
func describeTLS(err error) string {
	var ua x509.UnknownAuthorityError
	var he x509.HostnameError
	var ci x509.CertificateInvalidError
	var rh tls.RecordHeaderError
	var al tls.AlertError
	var cv *tls.CertificateVerificationError
	switch {
	case errors.As(err, &ua):
		return "TLS: the registry's certificate is signed by an unknown authority (the node trusts its system roots and the image CA bundle it is given)"
	case errors.As(err, &he):
		return "TLS: the registry's certificate is not valid for " + safeHost(he.Host)
	case errors.As(err, &ci):
		return "TLS: the registry's certificate is invalid (expired, not yet valid, or not for a server)"
	case errors.As(err, &cv):
		return "TLS: the registry's certificate did not verify"
	case errors.As(err, &rh):
		return "TLS: the registry did not answer in TLS"
	case errors.As(err, &al):
		return "TLS: the registry sent the alert: " + al.Error()
	}
	return ""
}

// describeNet describes a failure to reach a peer or a transfer cut
// short.
func describeNet(err error) string {
	var errno syscall.Errno
	var dns *net.DNSError
	var ne net.Error
	switch {
	case errors.As(err, &dns):
		switch {
		case dns.IsNotFound:
			return "DNS: no such host"
		case dns.IsTimeout:
			return "DNS: lookup timed out"
		}
		return "DNS: lookup failed"
	case errors.As(err, &errno):
		return "network: " + errno.Error()
	case errors.As(err, &ne) && ne.Timeout():
		return "network: timed out"
	case errors.Is(err, io.ErrUnexpectedEOF), errors.Is(err, io.EOF):
		return "network: the connection closed early"
	}
	return "network: the transfer failed"
}

// hasSentinel reports whether err already wraps one of the sentinels.
func hasSentinel(err error) bool {
	for _, s := range []error{ErrInvalidArgument, ErrNotFound, ErrUnauthorized, ErrUnavailable, ErrCorrupt, ErrUnsafe, ErrCacheFull, ErrClosed} {
		if errors.Is(err, s) {
			return true
		}
	}
	return false
}

// isNetworkError reports whether err looks like a failure to reach a peer
// or a transfer cut short, as opposed to bad content.
func isNetworkError(err error) bool {
	var ne net.Error
	if errors.As(err, &ne) {
		return true
	}
	if errors.Is(err, io.ErrUnexpectedEOF) || errors.Is(err, io.EOF) {
		return true
	}
	for _, e := range []syscall.Errno{syscall.ECONNREFUSED, syscall.ECONNRESET, syscall.ECONNABORTED,
		syscall.EPIPE, syscall.EHOSTUNREACH, syscall.ENETUNREACH, syscall.ETIMEDOUT} {
		if errors.Is(err, e) {
			return true
		}
	}
	return false
}

// classifyLocal wraps an error from writing the cache on the local disk.
func classifyLocal(err error) error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		return fmt.Errorf("%w: %w", ErrCacheFull, err)
	}
	return err
}
