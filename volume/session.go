package volume

import (
	"fmt"
	"os"

	"github.com/csi-memfs/csi-memfs/fusefs"
	"github.com/csi-memfs/csi-memfs/handoff"
)

// Session is what another process needs to serve a mounted volume: its
// FUSE connection, as Stop leaves it or as a holder keeps a copy of it
// (docs/restart.md). It passes between processes as a handoff.Bundle.
type Session struct {
	// s is the connection. Immutable.
	s fusefs.Session
}

// SessionOf unpacks a bundle made by Session.Bundle. A malformed bundle is
// closed.
func SessionOf(b handoff.Bundle) (Session, error) {
	if len(b.Files) != 2 || len(b.Meta) == 0 {
		b.Close()
		return Session{}, fmt.Errorf("volume %s: a session of %d descriptors and %d bytes, want 2 and INIT", b.ID, len(b.Files), len(b.Meta))
	}
	return Session{s: fusefs.Session{Dev: b.Files[0], Handles: b.Files[1], Init: b.Meta}}, nil
}

// Bundle packs s as the bundle of volume id. The bundle shares s's
// descriptors: close one or the other.
func (s Session) Bundle(id string) handoff.Bundle {
	return handoff.Bundle{ID: id, Meta: s.s.Init, Files: []*os.File{s.s.Dev, s.s.Handles}}
}

// Close closes the session's descriptors.
func (s Session) Close() { s.s.Close() }

// Session returns a copy of the served volume's session, with descriptors
// of its own: for a holder that keeps the connection alive should this
// process die. It stays valid while the volume is mounted.
func (v *Volume) Session() (Session, error) {
	if v.server == nil {
		return Session{}, fmt.Errorf("volume %s: not served", v.cfg.ID)
	}
	s, err := v.server.Session()
	return Session{s: s}, err
}
