package fusefs

import (
	"bytes"
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/hanwen/go-fuse/v2/fuse"
	"k8s.io/klog/v2"
)

// Choosing a mount's transport: FUSE over io_uring (uring_fuse.go) or
// /dev/fuse alone (session.go).

// Transport says how the kernel hands a mount's requests to this server.
type Transport string

const (
	// TransportAuto serves over io_uring where the kernel and the
	// container allow it and the mount will never change server
	// (Options.NoHandover); else over /dev/fuse. The zero value means
	// auto.
	TransportAuto Transport = "auto"
	// TransportIOUring serves over io_uring or fails the mount. Such a
	// mount cannot be handed over: Session and Stop fail with
	// ErrRingHandover.
	TransportIOUring Transport = "io-uring"
	// TransportDevFuse serves over /dev/fuse only.
	TransportDevFuse Transport = "dev-fuse"
)

// ParseTransport parses "auto", "io-uring" or "dev-fuse"; "" is auto.
func ParseTransport(s string) (Transport, error) {
	switch t := Transport(s); t {
	case "", TransportAuto:
		return TransportAuto, nil
	case TransportIOUring, TransportDevFuse:
		return t, nil
	}
	return "", fmt.Errorf("fusefs: transport %q: want auto, io-uring or dev-fuse", s)
}

// ErrRingHandover is what Session and Stop return for a mount served over
// io_uring: the kernel cannot move such a connection's requests to
// another server without losing some (docs/restart.md, "FUSE over
// io_uring").
var ErrRingHandover = errors.New("fusefs: a connection served over io_uring cannot change server")

// enableURingParam is the fuse module's switch; the kernel offers
// FUSE_OVER_IO_URING in INIT only while it reads Y.
const enableURingParam = "/sys/module/fuse/parameters/enable_uring"

// offerRing says whether a mount should offer the ring in its INIT reply.
// For TransportAuto it returns false where the ring is out of reach, with
// one log line saying why; for TransportIOUring it returns that as an
// error. It may switch enable_uring on, and logs that.
func offerRing(opts Options) (bool, error) {
	t, err := ParseTransport(string(opts.Transport))
	if err != nil {
		return false, err
	}
	switch {
	case t == TransportDevFuse:
		return false, nil
	case t == TransportAuto && !opts.NoHandover:
		// The common case of csi-memfs volumes: say it quietly.
		klog.V(2).InfoS("Serving over /dev/fuse: a mount that can change server cannot use io_uring", "fsName", opts.FsName)
		return false, nil
	}
	if err := ringUsable(); err != nil {
		if t == TransportIOUring {
			return false, err
		}
		klog.InfoS("FUSE over io_uring unavailable; serving over /dev/fuse", "fsName", opts.FsName, "reason", err.Error())
		return false, nil
	}
	return true, nil
}

// ringUsable checks that this process may make a ring (io_uring_setup can
// fail with ENOSYS, or EPERM under kernel.io_uring_disabled or a seccomp
// filter) and that the fuse module offers it, switching enable_uring on
// where it may.
func ringUsable() error {
	r, err := newURing(2)
	if err != nil {
		return err
	}
	r.close()
	b, err := os.ReadFile(enableURingParam)
	if err != nil {
		return fmt.Errorf("the kernel has no FUSE over io_uring (Linux >= 6.14, CONFIG_FUSE_IO_URING): %w", err)
	}
	if bytes.HasPrefix(b, []byte("Y")) {
		return nil
	}
	if err := os.WriteFile(enableURingParam, []byte("Y"), 0); err != nil {
		return fmt.Errorf("%s is N and cannot be set: %w", enableURingParam, err)
	}
	klog.InfoS("Switched FUSE over io_uring on for the node", "param", enableURingParam)
	return nil
}

// acceptRing starts the ring after INIT, if INIT negotiated it. With
// TransportAuto, a kernel that did not offer it, or a ring that fails to
// register, leaves the mount on /dev/fuse (logged); with
// TransportIOUring that is an error.
//
// Preconditions: s.readInit has run; no reader serves yet.
func (s *session) acceptRing(opts Options) error {
	io, err := parseInitReply(s.init[binary.LittleEndian.Uint32(s.init):])
	if err != nil {
		return err
	}
	if io.Flags64()&fuse.CAP_OVER_IO_URING == 0 {
		err = errors.New("the kernel did not offer FUSE_OVER_IO_URING in INIT")
	} else if s.ring, err = startRing(s, io); err == nil {
		s.raw.onRing.Store(true)
	} else {
		// Until told otherwise the kernel holds every request back
		// for the ring.
		if derr := disarmRing(s.devFd); derr != nil {
			return fmt.Errorf("%w; and turning the ring off failed: %w", err, derr)
		}
	}
	if err != nil && opts.Transport != TransportIOUring {
		klog.InfoS("FUSE over io_uring refused; serving over /dev/fuse", "fsName", opts.FsName, "reason", err.Error())
		err = nil
	}
	return err
}

// refuseRingInit fails the adoption of a connection whose recorded INIT
// (session.init) chose the ring.
func refuseRingInit(init []byte) error {
	if len(init) < 4 || int(binary.LittleEndian.Uint32(init)) > len(init) {
		return nil // replayInit says what is wrong
	}
	n := binary.LittleEndian.Uint32(init)
	if io, err := parseInitReply(init[n:]); err == nil && io.Flags64()&fuse.CAP_OVER_IO_URING != 0 {
		return ErrRingHandover
	}
	return nil
}

// Transport returns how requests reach the server: "io-uring" or
// "dev-fuse".
func (s *Server) Transport() Transport {
	if s.sess.ring != nil {
		return TransportIOUring
	}
	return TransportDevFuse
}
