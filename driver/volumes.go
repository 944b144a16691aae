package driver

import (
	"context"
	"errors"
	"fmt"
	"os"
	"slices"
	"syscall"
	"time"

	"github.com/go-logr/logr"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-memfs/csi-memfs/volume"
)

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

	if e := d.vols.get(id); e != nil {
		if e.lost {
			// The previous process's volume. kubelet publishes it again
			// only if that publish never reported success (or with
			// requiresRepublish, when the container's mount is dead
			// anyway): replace it.
			logger.V(1).Info("Replacing a volume lost in a plugin restart", "volumeID", id)
			if err := d.teardown(ctx, e, e.target(spec.TargetPath)); err != nil {
				return err
			}
		} else if diff := e.rec.Spec.difference(spec); diff == "target_path" {
			return errorf(codes.FailedPrecondition,
				"volume %s is already published at %s; an ephemeral volume has one target path", id, e.rec.Spec.TargetPath)
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
	img, lower, err := d.lowerLayer(ctx, spec.Params, secrets)
	if err != nil {
		return err
	}
	if img != nil {
		undo.push(func() error { img.Release(); return nil })
	}
	if err := d.budget.reserve(spec.Params.Size); err != nil {
		return err
	}
	undo.push(func() error { d.budget.release(spec.Params.Size); return nil })

	rec := record{Version: recordVersion, VolumeID: id, Spec: spec, Pod: pod, PublishedAt: time.Now().UTC()}
	if img != nil {
		// A successor process re-pins the image from this before any
		// collection.
		rec.ImageDigest = img.Digest
	}
	if err := d.journal.write(rec); err != nil {
		return fmt.Errorf("volume %s: journal: %w", id, err)
	}
	undo.push(func() error { return d.journal.remove(id) })

	vol, err := volume.Build(d.volumeConfig(id, spec, lower))
	if err != nil {
		return buildError(id, spec.Params, err)
	}
	undo.push(vol.Close)

	created, err := makeTarget(d.cfg.KubeletDir, spec.TargetPath)
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
	if err := vol.Mount(); err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	warnDegraded(logger, vol)
	// Before kubelet hears of the volume: from now on a crash of this
	// process does not break its mount.
	d.holder.put(id, vol)
	d.vols.put(&entry{rec: rec, reserved: spec.Params.Size, upper: d.journal.upperDir(id), vol: vol, img: img})
	return nil
}

// buildError converts a failure of volume.Build of volume id with
// params p. ENOSPC: the limits leave no room for the root or the seals'
// copy-up; EINVAL with noswap: the kernel refuses it. A seal's EBUSY and
// EPERM come from the files (a file the image made unsealable); the rest
// is internal.
func buildError(id string, p volumeParams, err error) error {
	var se *volume.SealError
	sealing := errors.As(err, &se)
	switch {
	case errors.Is(err, syscall.ENOSPC):
		return errorf(codes.InvalidArgument,
			"volume %s: volumeAttributes.%s (%d) leaves no room to set the volume up (%v); want more inodes (and %s)",
			id, attrInodes, p.Inodes, err, attrSize)
	case p.NoSwap && !sealing && errors.Is(err, syscall.EINVAL):
		return errorf(codes.FailedPrecondition,
			"volume %s: volumeAttributes.%s: this node's kernel refuses tmpfs noswap (Linux 6.4 or later has it): %v",
			id, attrNoSwap, err)
	case sealing && (errors.Is(err, syscall.EPERM) || errors.Is(err, syscall.EBUSY) || errors.Is(err, syscall.EOPNOTSUPP)):
		return errorf(codes.FailedPrecondition, "volume %s: volumeAttributes.%s: cannot seal %v", id, attrSeal, se.Err)
	case sealing:
		return fmt.Errorf("volume %s: volumeAttributes.%s: %w", id, attrSeal, se.Err)
	}
	return fmt.Errorf("volume %s: %w", id, err)
}

// unpublish unpublishes volume id from target. An unknown volume, or one
// not published at target, is success once target holds no mount of it.
func (d *Driver) unpublish(ctx context.Context, id, target string) (podInfo, error) {
	unlock, err := d.vols.lock(ctx, id)
	if err != nil {
		return podInfo{}, err
	}
	defer unlock()

	e := d.vols.get(id)
	if e == nil || e.target(target) != target {
		return podInfo{}, d.cleanForeignTarget(ctx, id, target)
	}
	return e.rec.Pod, d.teardown(ctx, e, target)
}

// teardown unmounts volume e from target, frees it and forgets it. Every
// step can be repeated, so a teardown that failed half way finishes on the
// next try. Whatever target holds (the mount, a directory, a dead mount,
// nothing, or something that is not the volume's), the volume's memory,
// reservation and record are freed.
//
// Preconditions:
//   - e's registry lock is held.
func (d *Driver) teardown(ctx context.Context, e *entry, target string) error {
	id := e.id()
	logger := klog.FromContext(ctx)
	e.mu.Lock()
	defer e.mu.Unlock()
	// The holder's copy of the connection would keep it alive.
	d.holder.del(id)
	kind, why, err := inspectTarget(d.cfg.KubeletDir, target)
	if err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	if e.vol != nil {
		if kind == targetMount || kind == targetDeadMount {
			if err := e.vol.Unmount(); err != nil {
				return fmt.Errorf("volume %s: %w", id, err)
			}
		} else {
			// The mount is no longer at target (unmounted or removed
			// from outside): end the connection without touching the
			// path.
			e.vol.Disconnect()
		}
	}
	switch kind {
	case targetDir, targetMount, targetDeadMount:
		// Remove the target directory. If it is still a mount point (a
		// dead FUSE mount left by a previous process answers "transport
		// endpoint is not connected"), mount-utils unmounts it first; it
		// runs umount(8), so the common case, a plain directory, skips
		// it.
		if err := os.Remove(target); err != nil && !isNotExist(err) {
			if err := mount.CleanupMountPoint(target, d.mounter, false); err != nil {
				return fmt.Errorf("volume %s: target_path %s: %w", id, target, err)
			}
		}
	case targetUnsafe:
		logger.Info("Leaving alone a target path that is not the volume's", "volumeID", id, "targetPath", target, "reason", why)
	}
	if e.vol != nil {
		d.metrics.retire(e.vol)
		if err := e.vol.Close(); err != nil {
			return fmt.Errorf("volume %s: %w", id, err)
		}
		e.vol = nil
	} else if err := volume.RemoveUpper(e.upper); err != nil {
		return fmt.Errorf("volume %s: %w", id, err)
	}
	// The image is unpinned once nothing serves it any more; the journal
	// record that names it goes after.
	if e.img != nil {
		e.img.Release()
		e.img = nil
	}
	if err := d.journal.remove(id); err != nil {
		return fmt.Errorf("volume %s: journal: %w", id, err)
	}
	d.vols.remove(id)
	d.budget.release(e.reserved)
	logger.V(4).Info("Volume torn down", "volumeID", id)
	return nil
}

// cleanForeignTarget handles unpublish of a volume that is not published
// at target: a csi-memfs mount of this volume id there (left by a lost
// process whose journal is gone) is unmounted, and an empty target
// directory is removed. Anything else at target is left alone.
func (d *Driver) cleanForeignTarget(ctx context.Context, id, target string) error {
	kind, _, err := inspectTarget(d.cfg.KubeletDir, target)
	if err != nil {
		return err
	}
	if kind != targetDir && kind != targetMount && kind != targetDeadMount {
		return nil
	}
	if kind != targetDir {
		mps, err := d.mounter.List()
		if err != nil {
			return fmt.Errorf("listing mounts: %w", err)
		}
		for _, mp := range mps {
			if mp.Path == target && mp.Device == volume.Source(id) {
				klog.FromContext(ctx).V(2).Info("Unmounting an unrecorded mount of the volume", "volumeID", id, "targetPath", target)
				if err := unix.Unmount(target, unix.MNT_DETACH|unix.UMOUNT_NOFOLLOW); err != nil && err != unix.EINVAL {
					return fmt.Errorf("target_path %s: %w", target, err)
				}
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
	for _, e := range d.vols.snapshot() {
		reserved += e.reserved
		ids = append(ids, e.id())
		e.mu.RLock()
		served, hasImage := e.vol != nil, e.img != nil
		if hasImage {
			pinned[e.img.Digest] = true
		}
		e.mu.RUnlock()
		if !e.lost && !served {
			return fmt.Errorf("published volume %s is not served", e.id())
		}
		if e.lost && served {
			return fmt.Errorf("lost volume %s is served", e.id())
		}
		if !e.lost && hasImage != (e.rec.ImageDigest != "") {
			return fmt.Errorf("published volume %s: image %v, journal digest %q", e.id(), hasImage, e.rec.ImageDigest)
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
	if d.budget.limit > 0 && reserved > d.budget.limit && !slices.ContainsFunc(d.vols.snapshot(), func(e *entry) bool { return e.lost }) {
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
