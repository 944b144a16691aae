package fusefs

import (
	"sync"
	"sync/atomic"
)

// Attributes the kernel holds stale.
//
// READDIRPLUS answers an entry whose inode the kernel holds with its name
// alone (node id 0): the kernel keeps what it has. That is the right
// answer only while what it has is fresh; otherwise the full answer is
// cheaper than the GETATTR the next stat would send for it, as after cp,
// whose writes had the kernel mark each file's size and times stale, and
// `ls -l` would then pay a GETATTR per file. staleAttrs remembers the
// inodes whose attributes this server made the kernel drop or doubt: the
// targets of its invalidation notices, the files write-only passthrough
// opens have written (the kernel marks their size and times stale at each
// write), the directories its namespace operations changed (the kernel
// drops all of a changed directory's attributes), the inodes whose links
// or xattrs changed; an attribute reply with the hour-long timeout takes
// an inode off. What the kernel drops by itself, unseen (a passthrough
// read's atime), is not known here: such an entry gets the short answer
// and, if the caller then needs the attribute, a GETATTR. Either answer
// is correct; this only picks the cheaper one.
type staleAttrs struct {
	// n is len(m), read without mu on the reply path.
	n atomic.Int64
	// mu protects m.
	mu sync.Mutex
	// m holds at most maxStaleAttrs inodes; past that an arbitrary one
	// is dropped (it then gets a short answer and maybe a GETATTR).
	m map[uint64]struct{}
}

// maxStaleAttrs bounds staleAttrs: 64 Ki inodes, about 3 MiB.
const maxStaleAttrs = 1 << 16

// add notes that the kernel's attributes of ino are stale.
func (s *staleAttrs) add(ino uint64) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.m == nil {
		s.m = make(map[uint64]struct{})
	}
	if _, ok := s.m[ino]; ok {
		return
	}
	if len(s.m) >= maxStaleAttrs {
		for k := range s.m {
			delete(s.m, k)
			break
		}
	}
	s.m[ino] = struct{}{}
	s.n.Store(int64(len(s.m)))
}

// fresh notes that the kernel was given ino's attributes for long.
func (s *staleAttrs) fresh(ino uint64) {
	if s.n.Load() == 0 {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	delete(s.m, ino)
	s.n.Store(int64(len(s.m)))
}

// has says whether the kernel's attributes of ino may be stale.
func (s *staleAttrs) has(ino uint64) bool {
	if s.n.Load() == 0 {
		return false
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	_, ok := s.m[ino]
	return ok
}

// changed notes, when err is nil, that an operation made the kernel drop
// or doubt the attributes of inos: the directories whose entries it
// changed, an inode whose links or xattrs it changed.
func (r *rawFS) changed(err error, inos ...uint64) {
	if err != nil {
		return
	}
	for _, ino := range inos {
		r.stale.add(ino)
	}
}
