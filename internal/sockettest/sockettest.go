// Package sockettest holds what tests of our unix sockets share.
package sockettest

import (
	"net"
	"testing"
	"time"

	"github.com/csi-memfs/csi-memfs/handoff"
)

// WaitNewSocket waits until the socket at path is another than old (by
// its handoff.Stamp), and answers a dial.
func WaitNewSocket(t testing.TB, path string, old handoff.Stamp) {
	t.Helper()
	deadline := time.Now().Add(10 * time.Second)
	for {
		if id := handoff.StampAt(path); id != old && id != (handoff.Stamp{}) {
			if c, err := net.Dial("unix", path); err == nil {
				c.Close()
				return
			}
		}
		if time.Now().After(deadline) {
			t.Fatalf("no new socket at %s", path)
		}
		time.Sleep(10 * time.Millisecond)
	}
}
