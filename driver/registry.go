package driver

import (
	"context"
	"sync"

	"google.golang.org/grpc/codes"

	"github.com/csi-memfs/csi-memfs/image"
	"github.com/csi-memfs/csi-memfs/volume"
)

// entry is one volume the driver knows: published (served by this
// process), or lost (recorded by a previous process, whose server of it is
// gone).
type entry struct {
	// rec is the volume's journal record. Immutable.
	rec record
	// lost is true for a volume recorded by a previous process that no
	// session serves: vol is nil. Immutable.
	lost bool
	// damaged is true for a lost volume whose journal record could not be
	// read: rec holds only its id, and its unpublish takes the target
	// path from the request. Immutable.
	damaged bool
	// reserved is the number of bytes the volume holds in the budget.
	// Immutable.
	reserved int64
	// upper is the mount point of the memory layer. Immutable.
	upper string

	// mu protects vol and img: readers (stats, metrics) hold it for
	// reading while they use vol; teardown and handover hold it for
	// writing to let go of them. Taken after the volume's registry lock.
	mu sync.RWMutex
	// vol is the volume served on rec.Spec.TargetPath; nil for a lost
	// volume and once torn down or handed over. Protected by mu.
	vol *volume.Volume
	// img is the pinned image the volume's lower directory is in; nil for
	// a pure memory volume and once released. A lost volume holds its
	// image re-pinned. Protected by mu.
	img *image.Image
}

// id returns the volume's id.
func (e *entry) id() string { return e.rec.VolumeID }

// target returns the volume's target path; for a damaged record, which
// does not know it, the one a request names.
func (e *entry) target(requested string) string {
	if e.damaged {
		return requested
	}
	return e.rec.Spec.TargetPath
}

// sample reads e for a scrape; false when e is being unpublished. A lost
// volume's memory layer, still mounted under the state directory, is
// measured on its mount point.
func (e *entry) sample() (volumeSample, bool) {
	e.mu.RLock()
	defer e.mu.RUnlock()
	s := volumeSample{id: e.id(), podNamespace: e.rec.Pod.Namespace, podName: e.rec.Pod.Name, lost: e.lost}
	if e.lost {
		if e.reserved == 0 {
			return s, true
		}
		u, err := volume.UpperUsage(e.upper)
		if err != nil {
			return s, true
		}
		s.held, s.u = true, u
		return s, true
	}
	if e.vol == nil {
		return s, false
	}
	u, err := e.vol.Usage()
	if err != nil {
		return s, false
	}
	s.u, s.passthrough, s.sealViolations, s.panics = u, e.vol.Passthrough(), e.vol.SealViolations(), e.vol.Panics()
	s.transport = e.vol.Transport()
	s.degraded = volumeDegraded(e.vol)
	return s, true
}

// registry is the set of volumes the driver knows, and the per-volume
// locks that serialize operations on each.
type registry struct {
	// locksMu protects locks. A leaf: held only to look an entry up.
	locksMu sync.Mutex
	// locks holds one lock per volume id that an operation holds or waits
	// for. Invariant: an entry exists exactly while its refs > 0.
	locks map[string]*volumeLock

	// mu protects vols. Never held across I/O or while taking another lock.
	mu sync.RWMutex
	// vols maps volume id to entry. Invariant: a volume is in vols from
	// the moment its publish succeeds (or the journal recovers it) until
	// its unpublish finishes.
	vols map[string]*entry
}

// volumeLock is the lock of one volume id.
type volumeLock struct {
	// sem holds a token while the lock is held.
	sem chan struct{}
	// refs counts holders and waiters. Protected by registry.locksMu.
	refs int
}

func newRegistry() *registry {
	return &registry{locks: map[string]*volumeLock{}, vols: map[string]*entry{}}
}

// lock takes the lock of volume id, or fails with Aborted when ctx ends
// first (kubelet retries; CSI's answer for "an operation is pending").
func (r *registry) lock(ctx context.Context, id string) (unlock func(), err error) {
	r.locksMu.Lock()
	l := r.locks[id]
	if l == nil {
		l = &volumeLock{sem: make(chan struct{}, 1)}
		r.locks[id] = l
	}
	l.refs++
	r.locksMu.Unlock()

	release := func() {
		r.locksMu.Lock()
		if l.refs--; l.refs == 0 {
			delete(r.locks, id)
		}
		r.locksMu.Unlock()
	}
	select {
	case l.sem <- struct{}{}:
		return func() { <-l.sem; release() }, nil
	case <-ctx.Done():
		release()
		return nil, errorf(codes.Aborted, "volume %s: another operation on it is still running: %v", id, ctx.Err())
	}
}

func (r *registry) get(id string) *entry {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.vols[id]
}

func (r *registry) put(v *entry) {
	r.mu.Lock()
	r.vols[v.id()] = v
	r.mu.Unlock()
}

func (r *registry) remove(id string) {
	r.mu.Lock()
	delete(r.vols, id)
	r.mu.Unlock()
}

// snapshot returns the volumes, in no order.
func (r *registry) snapshot() []*entry {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*entry, 0, len(r.vols))
	for _, v := range r.vols {
		out = append(out, v)
	}
	return out
}

func (r *registry) len() int {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return len(r.vols)
}

// samples reads every volume for a scrape, leaving out those being
// unpublished.
func (r *registry) samples() []volumeSample {
	var out []volumeSample
	for _, e := range r.snapshot() {
		if s, ok := e.sample(); ok {
			out = append(out, s)
		}
	}
	return out
}
