package driver

import (
	"errors"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
)

// MetricsAddressFile is the file in the state directory where a serving
// plugin writes the address its metrics server listens on, as a client
// on the node reaches it (HOST:PORT, an unspecified host made loopback).
// `csi-memfs volumes` reads it, so it finds the plugin whatever
// --metrics-address the chart gave.
const MetricsAddressFile = "metrics-address"

// ReadMetricsAddress returns the metrics address a plugin serving with
// state directory stateDir wrote, or an error (fs.ErrNotExist if none).
func ReadMetricsAddress(stateDir string) (string, error) {
	b, err := os.ReadFile(filepath.Join(stateDir, MetricsAddressFile))
	if err != nil {
		return "", err
	}
	addr := strings.TrimSpace(string(b))
	if _, _, err := net.SplitHostPort(addr); err != nil {
		return "", fmt.Errorf("%s: %w", filepath.Join(stateDir, MetricsAddressFile), err)
	}
	return addr, nil
}

// dialable returns the address a client on this node dials to reach a
// listener on addr: an unspecified host (":9809", "0.0.0.0", "::")
// becomes the loopback address of its family.
func dialable(addr net.Addr) string {
	tcp, ok := addr.(*net.TCPAddr)
	if !ok {
		return addr.String()
	}
	ip := tcp.IP
	switch {
	case ip == nil || ip.Equal(net.IPv4zero):
		ip = net.IPv4(127, 0, 0, 1)
	case ip.Equal(net.IPv6unspecified):
		ip = net.IPv6loopback
	}
	return net.JoinHostPort(ip.String(), fmt.Sprint(tcp.Port))
}

// metricsAddressFile is the file a serving process wrote, removed by
// remove only while it is still this process's (a successor serving
// beside it writes its own, replacing it).
type metricsAddressFile struct {
	path string
	// dev and ino identify the file written.
	dev, ino uint64
}

// writeMetricsAddress writes addr to <stateDir>/metrics-address
// atomically: to a temporary file renamed over it.
func writeMetricsAddress(stateDir, addr string) (*metricsAddressFile, error) {
	path := filepath.Join(stateDir, MetricsAddressFile)
	tmp, err := os.CreateTemp(stateDir, "."+MetricsAddressFile+"-*")
	if err != nil {
		return nil, err
	}
	_, err = tmp.WriteString(addr + "\n")
	if err == nil {
		err = tmp.Chmod(0o644)
	}
	var st unix.Stat_t
	if err == nil {
		err = unix.Fstat(int(tmp.Fd()), &st)
	}
	if cerr := tmp.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(tmp.Name(), path)
	}
	if err != nil {
		os.Remove(tmp.Name())
		return nil, err
	}
	return &metricsAddressFile{path: path, dev: uint64(st.Dev), ino: st.Ino}, nil
}

// remove removes the file if it is still the one this process wrote.
func (f *metricsAddressFile) remove() error {
	if f == nil {
		return nil
	}
	var st unix.Stat_t
	if err := unix.Stat(f.path, &st); err != nil {
		if errors.Is(err, unix.ENOENT) {
			return nil
		}
		return err
	}
	if uint64(st.Dev) != f.dev || st.Ino != f.ino {
		return nil // a successor's
	}
	return os.Remove(f.path)
}
