package image

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
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
	// ErrUnavailable: the registry could not be reached, failed (5xx, 429),
	// broke off a transfer, stalled, or would need plain HTTP to a host that
	// is neither loopback nor listed as insecure. Unavailable.
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
	// under the cache is full. ResourceExhausted.
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

// insecureError is returned by guardTransport for a plain-HTTP request to a
// host that may only be spoken to over TLS.
type insecureError struct{ host string }

func (e *insecureError) Error() string {
	return fmt.Sprintf("plain HTTP to %s refused: not a loopback address and not an insecure registry", e.host)
}

// classifyRemote wraps err, returned by go-containerregistry while talking
// to a registry about ref, with the sentinel that says what went wrong.
// Errors that already carry a sentinel, and context errors, are returned
// as they are.
func classifyRemote(ref string, err error) error {
	if err == nil {
		return nil
	}
	if hasSentinel(err) {
		return err
	}
	if errors.Is(err, context.Canceled) || errors.Is(err, context.DeadlineExceeded) {
		return err
	}
	var ie *insecureError
	if errors.As(err, &ie) {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, ref, err)
	}
	var te *transport.Error
	if errors.As(err, &te) {
		for _, d := range te.Errors {
			switch d.Code {
			case transport.UnauthorizedErrorCode, transport.DeniedErrorCode:
				return fmt.Errorf("%w: %s: %w", ErrUnauthorized, ref, err)
			case transport.ManifestUnknownErrorCode, transport.NameUnknownErrorCode, transport.BlobUnknownErrorCode:
				return fmt.Errorf("%w: %s: %w", ErrNotFound, ref, err)
			}
		}
		switch {
		case te.StatusCode == http.StatusUnauthorized || te.StatusCode == http.StatusForbidden:
			return fmt.Errorf("%w: %s: %w", ErrUnauthorized, ref, err)
		case te.StatusCode == http.StatusNotFound:
			return fmt.Errorf("%w: %s: %w", ErrNotFound, ref, err)
		case te.StatusCode == http.StatusTooManyRequests || te.StatusCode >= 500:
			return fmt.Errorf("%w: %s: %w", ErrUnavailable, ref, err)
		}
		return fmt.Errorf("%s: %w", ref, err)
	}
	if isNetworkError(err) {
		return fmt.Errorf("%w: %s: %w", ErrUnavailable, ref, err)
	}
	return fmt.Errorf("%s: %w", ref, err)
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
