package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path"
	"slices"
	"strconv"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-memfs/csi-memfs/fusefs"
	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// publishSpec is everything a NodePublishVolume asks for, validated. Two
// publishes of one volume are the same request exactly when their specs
// are equal.
type publishSpec struct {
	// TargetPath is the absolute, cleaned path kubelet mounts the pod's
	// volume from.
	TargetPath string `json:"targetPath"`
	// Params are the volume's attributes.
	Params volumeParams `json:"params"`
	// ReadOnly mounts the volume read-only.
	ReadOnly bool `json:"readOnly,omitempty"`
	// MountGroup is the gid (decimal) that owns the volume's root
	// directory, from volume_mount_group; empty for none.
	MountGroup string `json:"mountGroup,omitempty"`
	// AccessMode is the capability's access mode.
	AccessMode csi.VolumeCapability_AccessMode_Mode `json:"accessMode"`
}

// difference names the first field in which s and t differ, or "".
func (s publishSpec) difference(t publishSpec) string {
	switch {
	case s.TargetPath != t.TargetPath:
		return "target_path"
	case !s.Params.equal(t.Params):
		return "volume_context (volumeAttributes)"
	case s.ReadOnly != t.ReadOnly:
		return "readonly"
	case s.MountGroup != t.MountGroup:
		return "volume_capability.mount.volume_mount_group"
	case s.AccessMode != t.AccessMode:
		return "volume_capability.access_mode"
	}
	return ""
}

// volume is one published volume.
type volume struct {
	// rec is the volume's journal record. Immutable.
	rec record
	// lost is true for a volume recorded by a previous process: its FUSE
	// server is gone and layer and server are nil. Immutable.
	lost bool
	// reserved is the number of bytes the volume holds in the budget.
	// Immutable.
	reserved int64
	// upper is the mount point of the memory layer. Immutable.
	upper string

	// mu protects layer and server: readers (stats, metrics) hold it for
	// reading while they use them; unpublish holds it for writing to shut
	// them down. Taken after the volume's registry lock.
	mu sync.RWMutex
	// layer is the memory layer; nil for a lost volume and once closed.
	layer *memfs.Layer
	// ov is the overlay of layer over the image's lower layer; nil for a
	// pure memory volume, a lost volume and once closed.
	ov *overlay.FS
	// lower is the image's lower layer (pinned image and its Lower); nil
	// for a pure memory volume and once released. A lost volume holds the
	// image re-pinned in lower.img, with no Lower.
	lower *lowerImage
	// server serves the volume on rec.Spec.TargetPath; nil for a lost
	// volume and once unmounted.
	server *fusefs.Server
}

// id returns the volume's id.
func (v *volume) id() string { return v.rec.VolumeID }

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
	// vols maps volume id to volume. Invariant: a volume is in vols from
	// the moment its publish succeeds (or the journal recovers it) until
	// its unpublish finishes.
	vols map[string]*volume
}

// volumeLock is the lock of one volume id.
type volumeLock struct {
	// sem holds a token while the lock is held.
	sem chan struct{}
	// refs counts holders and waiters. Protected by registry.locksMu.
	refs int
}

func newRegistry() *registry {
	return &registry{locks: map[string]*volumeLock{}, vols: map[string]*volume{}}
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

func (r *registry) get(id string) *volume {
	r.mu.RLock()
	defer r.mu.RUnlock()
	return r.vols[id]
}

func (r *registry) put(v *volume) {
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
func (r *registry) snapshot() []*volume {
	r.mu.RLock()
	defer r.mu.RUnlock()
	out := make([]*volume, 0, len(r.vols))
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

// budget is the node's memory budget and volume count. Reservations are
// made with compare-and-swap, so publishes never wait for each other here.
type budget struct {
	// limit is the byte budget; 0 means none. Immutable.
	limit int64
	// maxVolumes bounds the number of volumes; 0 means none. Immutable.
	maxVolumes int64
	// bytes is the sum of the reserved sizes. Accessed atomically.
	// Invariant: bytes <= limit when limit > 0, except after recovering
	// lost volumes, which are counted whatever the limit.
	bytes atomic.Int64
	// volumes is the number of reservations. Accessed atomically.
	volumes atomic.Int64
}

// reserve takes size bytes and one volume from the budget, or fails with
// ResourceExhausted and takes nothing.
func (b *budget) reserve(size int64) error {
	for {
		cur := b.bytes.Load()
		if b.limit > 0 && cur+size > b.limit {
			return errorf(codes.ResourceExhausted,
				"node memory budget exhausted: %s requested, %s of %s already reserved by other volumes (flag --node-memory-budget)",
				quantityString(size), quantityString(cur), quantityString(b.limit))
		}
		if b.bytes.CompareAndSwap(cur, cur+size) {
			break
		}
	}
	for {
		cur := b.volumes.Load()
		if b.maxVolumes > 0 && cur >= b.maxVolumes {
			b.bytes.Add(-size)
			return errorf(codes.ResourceExhausted,
				"node volume limit reached: %d volumes published (flag --max-volumes)", cur)
		}
		if b.volumes.CompareAndSwap(cur, cur+1) {
			return nil
		}
	}
}

// force reserves like reserve but ignores the limits: for recovered
// volumes, which hold their memory whatever the budget says.
func (b *budget) force(size int64) {
	b.bytes.Add(size)
	b.volumes.Add(1)
}

// release returns a reservation of size bytes.
func (b *budget) release(size int64) {
	b.bytes.Add(-size)
	b.volumes.Add(-1)
}

// undoStack collects the steps that undo a partly done operation.
type undoStack []func() error

func (u *undoStack) push(f func() error) { *u = append(*u, f) }

// run undoes every step, last first, logging failures.
func (u undoStack) run(logger logr.Logger, id string) {
	for i := len(u) - 1; i >= 0; i-- {
		if err := u[i](); err != nil {
			logger.Error(err, "Undoing a failed publish", "volumeID", id)
		}
	}
}

// publish publishes volume id as spec asks (see the package doc). secrets
// are the request's secrets (image pull credentials); they are never
// logged or recorded.
func (d *Driver) publish(ctx context.Context, id string, spec publishSpec, pod podInfo, secrets map[string]string) (err error) {
	unlock, err := d.vols.lock(ctx, id)
	if err != nil {
		return err
	}
	defer unlock()
	logger := klog.FromContext(ctx)

	if v := d.vols.get(id); v != nil {
		if v.lost {
			// The previous process's volume. kubelet publishes it again
			// only if that publish never reported success (or with
			// requiresRepublish, when the container's mount is dead
			// anyway): replace it.
			logger.V(1).Info("Replacing a volume lost in a plugin restart", "volumeID", id)
			if err := d.teardown(ctx, v); err != nil {
				return err
			}
		} else if diff := v.rec.Spec.difference(spec); diff == "target_path" {
			return errorf(codes.FailedPrecondition,
				"volume %s is already published at %s; an ephemeral volume has one target path", id, v.rec.Spec.TargetPath)
		} else if diff != "" {
			return errorf(codes.AlreadyExists,
				"volume %s is already published at %s with a different %s", id, spec.TargetPath, diff)
		} else {
			return nil // the same request again
		}
	}

	var undo undoStack
	defer func() {
		if err != nil {
			undo.run(logger, id)
		}
	}()
	lower, err := d.lowerLayer(ctx, spec.Params, secrets)
	if err != nil {
		return err
	}
	if lower != nil {
		undo.push(lower.close)
	}
	if err := d.budget.reserve(spec.Params.Size); err != nil {
		return err
	}
	undo.push(func() error { d.budget.release(spec.Params.Size); return nil })

	rec := record{Version: recordVersion, VolumeID: id, Spec: spec, Pod: pod, PublishedAt: time.Now().UTC()}
	if lower != nil {
		// A successor process re-pins the image from this before any
		// collection.
		rec.ImageDigest = lower.img.Digest
	}
	if err := d.journal.write(rec); err != nil {
		return fmt.Errorf("volume %s: journal: %w", id, err)
	}
	undo.push(func() error { return d.journal.remove(id) })

	layer, err := memfs.New(d.journal.upperDir(id), memfs.Options{Size: spec.Params.Size, Inodes: spec.Params.Inodes, Fds: d.fds})
	if err != nil {
		return fmt.Errorf("volume %s: memory layer: %w", id, err)
	}
	undo.push(layer.Close)

	tree, ov, err := d.buildTree(layer, lower)
	if err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	if ov != nil {
		// Before layer.Close (pushed earlier, so run later).
		undo.push(func() error { ov.Close(); return nil })
	}
	if err := initRoot(tree, spec.MountGroup); err != nil {
		return fmt.Errorf("volume %s: root directory: %w", id, err)
	}
	if err := sealMatching(tree, spec.Params.Seal); err != nil {
		return sealError(id, err)
	}

	created, err := makeTarget(spec.TargetPath)
	if err != nil {
		return err
	}
	if created {
		undo.push(func() error {
			if err := os.Remove(spec.TargetPath); err != nil && !isNotExist(err) {
				return err
			}
			return nil
		})
	}
	server, err := fusefs.Mount(spec.TargetPath, tree, d.fuseOptions(id, spec))
	if err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	// Before kubelet hears of the volume: from now on a crash of this
	// process does not break its mount.
	d.holder.put(id, server)
	d.vols.put(&volume{rec: rec, reserved: spec.Params.Size, upper: d.journal.upperDir(id),
		layer: layer, ov: ov, lower: lower, server: server})
	return nil
}

// buildTree returns the tree a volume serves: the memory layer alone, or
// an overlay of it over lower (returned too, for its usage and Close). This
// is the one place a lower layer plugs in.
func (d *Driver) buildTree(layer *memfs.Layer, lower *lowerImage) (vfs.FS, *overlay.FS, error) {
	if lower == nil {
		return layer, nil, nil
	}
	ov, err := overlay.New(layer, lower.dir)
	if err != nil {
		return nil, nil, fmt.Errorf("overlay over image %s: %w", lower.img.Digest, err)
	}
	return ov, ov, nil
}

// sealError converts a failure of the seal attribute: EBUSY and EPERM
// come from the files (a file the image made unsealable), the rest is
// internal.
func sealError(id string, err error) error {
	if errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EBUSY) || errors.Is(err, syscall.EOPNOTSUPP) {
		return errorf(codes.FailedPrecondition, "volume %s: volumeAttributes.%s: cannot seal %v", id, attrSeal, err)
	}
	return fmt.Errorf("volume %s: volumeAttributes.%s: %w", id, attrSeal, err)
}

// initRoot sets the root directory's owner group and mode: with a mount
// group, group-owned by it and group-writable with set-group-ID (02775),
// as CSI's VOLUME_MOUNT_GROUP asks; without, writable by everyone (0777),
// like an emptyDir.
func initRoot(tree vfs.Attributes, mountGroup string) error {
	a := vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o777}
	if mountGroup != "" {
		gid, err := strconv.ParseUint(mountGroup, 10, 32)
		if err != nil {
			return err
		}
		a = vfs.SetAttr{Valid: vfs.SetGid | vfs.SetMode, Gid: uint32(gid), Mode: 0o2775}
	}
	_, err := tree.SetAttr(vfs.RootIno, nil, a)
	return err
}

// allSeals is the value of the seals xattr that seals a file completely.
var allSeals = []byte("write,grow,shrink,seal")

// sealMatching seals every regular file of tree whose path (relative to the
// root, slash-separated) matches one of globs.
func sealMatching(tree vfs.FS, globs []string) error {
	if len(globs) == 0 {
		return nil
	}
	var walk func(dir uint64, rel string) error
	walk = func(dir uint64, rel string) error {
		type child struct {
			name string
			typ  uint8
		}
		var children []child
		h, err := tree.OpenDir(dir)
		if err != nil {
			return err
		}
		err = h.ReadDir(0, func(e *vfs.DirEntry) bool {
			if e.Name != "." && e.Name != ".." {
				children = append(children, child{e.Name, e.Type})
			}
			return true
		})
		h.Close()
		if err != nil {
			return err
		}
		for _, c := range children {
			if c.typ != unix.DT_DIR && c.typ != unix.DT_REG {
				continue
			}
			p := path.Join(rel, c.name)
			e, err := tree.Lookup(dir, c.name)
			if err != nil {
				return fmt.Errorf("%s: %w", p, err)
			}
			ino := e.Ino()
			if c.typ == unix.DT_DIR {
				err = walk(ino, p)
			} else if matchAny(globs, p) {
				if err = tree.SetXattr(ino, memfs.SealsXattr, allSeals, 0); err != nil {
					err = fmt.Errorf("%s: %w", p, err)
				}
			}
			tree.Forget(ino, 1)
			if err != nil {
				return err
			}
		}
		return nil
	}
	return walk(vfs.RootIno, "")
}

// matchAny says whether name matches one of globs (path.Match).
func matchAny(globs []string, name string) bool {
	for _, g := range globs {
		if ok, _ := path.Match(g, name); ok {
			return true
		}
	}
	return false
}

// makeTarget creates the target directory (its parent must exist, as CSI
// has the CO create it) and says whether it did. An existing target must be
// an empty directory that is not a mount point.
func makeTarget(target string) (created bool, err error) {
	err = os.Mkdir(target, 0o750)
	if err == nil {
		return true, nil
	}
	if !errors.Is(err, os.ErrExist) {
		return false, fmt.Errorf("target_path %s: %w", target, err)
	}
	entries, err := os.ReadDir(target)
	switch {
	case mount.IsCorruptedMnt(err):
		return false, errorf(codes.FailedPrecondition, "target_path %s is a dead mount; unpublish it first", target)
	case err != nil:
		return false, errorf(codes.FailedPrecondition, "target_path %s: %v; want an empty directory or no file", target, err)
	case len(entries) > 0:
		return false, errorf(codes.FailedPrecondition, "target_path %s is not empty; want an empty directory or no file", target)
	}
	return false, nil
}

// unpublish unpublishes volume id from target. An unknown volume, or one
// not published at target, is success once target holds no mount of it.
func (d *Driver) unpublish(ctx context.Context, id, target string) (podInfo, error) {
	unlock, err := d.vols.lock(ctx, id)
	if err != nil {
		return podInfo{}, err
	}
	defer unlock()

	v := d.vols.get(id)
	if v == nil || v.rec.Spec.TargetPath != target {
		return podInfo{}, d.cleanForeignTarget(ctx, id, target)
	}
	return v.rec.Pod, d.teardown(ctx, v)
}

// teardown unmounts and frees volume v and forgets it. Every step can be
// repeated, so a teardown that failed half way finishes on the next try.
//
// Preconditions:
//   - v's registry lock is held.
func (d *Driver) teardown(ctx context.Context, v *volume) error {
	id, target := v.id(), v.rec.Spec.TargetPath
	v.mu.Lock()
	defer v.mu.Unlock()
	// The holder's copy of the connection would keep it alive.
	d.holder.del(id)
	if v.server != nil {
		if err := v.server.Unmount(); err != nil {
			return fmt.Errorf("volume %s: %w", id, err)
		}
		v.server = nil
	}
	// Remove the target directory. If it is still a mount point (a dead
	// FUSE mount left by a previous process answers "transport endpoint is
	// not connected"), mount-utils unmounts it first; it runs umount(8), so
	// the common case, a plain directory, skips it.
	if err := os.Remove(target); err != nil && !isNotExist(err) {
		if err := mount.CleanupMountPoint(target, d.mounter, false); err != nil {
			return fmt.Errorf("volume %s: target_path %s: %w", id, target, err)
		}
	}
	if v.ov != nil {
		v.ov.Close()
		v.ov = nil
	}
	if v.layer != nil {
		d.metrics.retire(v.layer)
		if err := v.layer.Close(); err != nil {
			return fmt.Errorf("volume %s: %w", id, err)
		}
		v.layer = nil
	} else if err := unmountUpper(v.upper); err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	// The image is unpinned once nothing serves it any more; the journal
	// record that names it goes after.
	if err := v.lower.close(); err != nil {
		return fmt.Errorf("volume %s: image lower layer: %w", id, err)
	}
	v.lower = nil
	if err := d.journal.remove(id); err != nil {
		return fmt.Errorf("volume %s: journal: %w", id, err)
	}
	d.vols.remove(id)
	d.budget.release(v.reserved)
	klog.FromContext(ctx).V(4).Info("Volume torn down", "volumeID", id)
	return nil
}

// unmountUpper detaches a memory layer a previous process left mounted on
// dir and removes dir. A missing dir is success.
func unmountUpper(dir string) error {
	for {
		err := unix.Unmount(dir, unix.MNT_DETACH)
		if err == unix.EINVAL || err == unix.ENOENT {
			break // not (or no longer) a mount point
		}
		if err != nil {
			return fmt.Errorf("unmount memory layer %s: %w", dir, err)
		}
	}
	if err := os.Remove(dir); err != nil && !isNotExist(err) {
		return fmt.Errorf("memory layer %s: %w", dir, err)
	}
	return nil
}

// cleanForeignTarget handles unpublish of a volume that is not published
// at target: a csi-memfs mount of this volume id there (left by a lost
// process whose journal is gone) is unmounted, and an empty target
// directory is removed. Anything else at target is left alone.
func (d *Driver) cleanForeignTarget(ctx context.Context, id, target string) error {
	mps, err := d.mounter.List()
	if err != nil {
		return fmt.Errorf("listing mounts: %w", err)
	}
	for _, mp := range mps {
		if mp.Path == target && mp.Device == "csi-memfs:"+id {
			klog.FromContext(ctx).V(2).Info("Unmounting an unrecorded mount of the volume", "volumeID", id, "targetPath", target)
			if err := unix.Unmount(target, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
				return fmt.Errorf("target_path %s: %w", target, err)
			}
		}
	}
	if err := unix.Rmdir(target); err != nil && err != unix.ENOENT && err != unix.ENOTEMPTY && err != unix.EBUSY && err != unix.ENOTDIR {
		return fmt.Errorf("target_path %s: %w", target, err)
	}
	return nil
}

// checkInvariants verifies the invariants of the registry, the budget and
// the journal. Tests call it when no operation is running.
func (d *Driver) checkInvariants() error {
	var reserved int64
	var ids []string
	pinned := map[string]bool{}
	for _, v := range d.vols.snapshot() {
		reserved += v.reserved
		ids = append(ids, v.id())
		v.mu.RLock()
		served, unserved := v.layer != nil && v.server != nil, v.layer == nil && v.server == nil
		v.mu.RUnlock()
		if !v.lost && !served {
			return fmt.Errorf("published volume %s has no memory layer or server", v.id())
		}
		if v.lost && !unserved {
			return fmt.Errorf("lost volume %s has a memory layer or server", v.id())
		}
		v.mu.RLock()
		hasImage, hasOverlay := v.lower != nil, v.ov != nil
		if hasImage {
			pinned[v.lower.img.Digest] = true
		}
		v.mu.RUnlock()
		if !v.lost && (hasImage != (v.rec.ImageDigest != "") || hasImage != hasOverlay) {
			return fmt.Errorf("published volume %s: image %v, overlay %v, journal digest %q", v.id(), hasImage, hasOverlay, v.rec.ImageDigest)
		}
	}
	if st := d.images.Stats(); st.Pinned != len(pinned) {
		return fmt.Errorf("image cache pins %d images, volumes use %d", st.Pinned, len(pinned))
	}
	if b := d.budget.bytes.Load(); b != reserved {
		return fmt.Errorf("budget reserves %d bytes, volumes hold %d", b, reserved)
	}
	if n := d.budget.volumes.Load(); n != int64(len(ids)) {
		return fmt.Errorf("budget counts %d volumes, registry holds %d", n, len(ids))
	}
	if d.budget.limit > 0 && reserved > d.budget.limit && !slices.ContainsFunc(d.vols.snapshot(), func(v *volume) bool { return v.lost }) {
		return fmt.Errorf("reserved %d bytes past the budget %d", reserved, d.budget.limit)
	}
	entries, err := os.ReadDir(d.journal.dir)
	if err != nil {
		return err
	}
	var recorded []string
	for _, e := range entries {
		recorded = append(recorded, e.Name())
	}
	slices.Sort(ids)
	slices.Sort(recorded)
	if !slices.Equal(ids, recorded) {
		return fmt.Errorf("journal records %v, registry holds %v", recorded, ids)
	}
	d.vols.locksMu.Lock()
	defer d.vols.locksMu.Unlock()
	if len(d.vols.locks) != 0 {
		return fmt.Errorf("%d volume locks held with no operation running", len(d.vols.locks))
	}
	return nil
}
