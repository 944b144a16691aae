package driver

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/codes"
)

// Target paths. kubelet names a target under <kubelet dir>/pods/ and
// creates its parent; nothing below the kubelet directory is followed
// through a symlink, so that a target cannot be redirected to another
// host path between kubelet's mkdir and our mount or unmount.

// targetKind is what a target path holds.
type targetKind int

const (
	// targetNoParent: the target's parent directory does not exist.
	targetNoParent targetKind = iota
	// targetAbsent: the parent exists, the target does not.
	targetAbsent
	// targetUnsafe: a component of the path below the kubelet directory
	// is a symlink, or is not a directory, or the target is not a
	// directory. Nothing there is touched.
	targetUnsafe
	// targetDir: a directory that is no mount point.
	targetDir
	// targetMount: a mount point.
	targetMount
	// targetDeadMount: a mount point whose server died (ENOTCONN).
	targetDeadMount
)

// checkTargetPath checks that target (absolute, cleaned) lies under
// <kubeletDir>/pods/.
func checkTargetPath(kubeletDir, target string) error {
	pods := filepath.Join(kubeletDir, "pods")
	if !strings.HasPrefix(target, pods+"/") {
		return errorf(codes.InvalidArgument,
			"target_path %s is not under kubelet's pods directory %s/ (flag --kubelet-dir)", target, pods)
	}
	return nil
}

// inspectTarget says what target holds, resolving every component below
// kubeletDir without following a symlink. why explains targetUnsafe.
func inspectTarget(kubeletDir, target string) (kind targetKind, why string, err error) {
	parent, err := openTargetParent(kubeletDir, target)
	switch {
	case errors.Is(err, unix.ENOENT):
		return targetNoParent, "", nil
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.EXDEV):
		return targetUnsafe, "a component of its parent is a symlink or not a directory", nil
	case err != nil:
		return 0, "", fmt.Errorf("target_path %s: %w", target, err)
	}
	defer unix.Close(parent)
	return inspectAt(parent, filepath.Base(target))
}

// openTargetParent opens target's parent directory (O_PATH), resolved
// beneath kubeletDir without following a symlink.
func openTargetParent(kubeletDir, target string) (int, error) {
	root, err := unix.Open(kubeletDir, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("kubelet directory %s: %w", kubeletDir, err)
	}
	defer unix.Close(root)
	rel, err := filepath.Rel(kubeletDir, filepath.Dir(target))
	if err != nil {
		return -1, err
	}
	for {
		fd, err := unix.Openat2(root, rel, &unix.OpenHow{
			Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC,
			Resolve: unix.RESOLVE_BENEATH | unix.RESOLVE_NO_SYMLINKS | unix.RESOLVE_NO_MAGICLINKS,
		})
		if err != unix.EAGAIN && err != unix.EINTR {
			return fd, err
		}
	}
}

// inspectAt says what the entry name of the directory dir holds, without
// following a symlink.
func inspectAt(dir int, name string) (targetKind, string, error) {
	var stx unix.Statx_t
	err := unix.Statx(dir, name, unix.AT_SYMLINK_NOFOLLOW|unix.AT_NO_AUTOMOUNT, unix.STATX_TYPE, &stx)
	switch {
	case err == unix.ENOENT:
		return targetAbsent, "", nil
	case err == unix.ENOTCONN || err == unix.ECONNABORTED:
		return targetDeadMount, "", nil
	case err != nil:
		return 0, "", err
	case stx.Mode&unix.S_IFMT == unix.S_IFLNK:
		return targetUnsafe, "it is a symlink", nil
	case stx.Mode&unix.S_IFMT != unix.S_IFDIR:
		return targetUnsafe, "it is not a directory", nil
	case stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 && stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0:
		return targetMount, "", nil
	}
	return targetDir, "", nil
}

// makeTarget prepares target for a mount: it creates the directory (its
// parent must exist: kubelet creates it, as CSI has the CO do) and says
// whether it did. An existing target must be an empty directory that is
// no mount point.
func makeTarget(kubeletDir, target string) (created bool, err error) {
	parent, err := openTargetParent(kubeletDir, target)
	switch {
	case errors.Is(err, unix.ENOENT):
		return false, errorf(codes.FailedPrecondition,
			"target_path %s: its parent directory does not exist; kubelet creates it before publishing", target)
	case errors.Is(err, unix.ELOOP), errors.Is(err, unix.ENOTDIR), errors.Is(err, unix.EXDEV):
		return false, errorf(codes.InvalidArgument,
			"target_path %s: a component below %s is a symlink or not a directory; want a path of plain directories",
			target, kubeletDir)
	case err != nil:
		return false, fmt.Errorf("target_path %s: %w", target, err)
	}
	defer unix.Close(parent)
	name := filepath.Base(target)
	kind, why, err := inspectAt(parent, name)
	if err != nil {
		return false, fmt.Errorf("target_path %s: %w", target, err)
	}
	switch kind {
	case targetAbsent:
		if err := unix.Mkdirat(parent, name, 0o750); err != nil {
			return false, fmt.Errorf("target_path %s: %w", target, err)
		}
		return true, nil
	case targetUnsafe:
		return false, errorf(codes.InvalidArgument, "target_path %s: %s; want a directory or no file", target, why)
	case targetDeadMount:
		return false, errorf(codes.FailedPrecondition, "target_path %s is a dead mount; unpublish it first", target)
	case targetMount:
		return false, errorf(codes.FailedPrecondition,
			"target_path %s is already a mount point (another volume's?); want an empty directory that is no mount point", target)
	}
	fd, err := unix.Openat(parent, name, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return false, errorf(codes.FailedPrecondition, "target_path %s: %v; want an empty directory or no file", target, err)
	}
	dir := os.NewFile(uintptr(fd), target)
	defer dir.Close()
	if names, _ := dir.Readdirnames(1); len(names) > 0 {
		return false, errorf(codes.FailedPrecondition, "target_path %s is not empty; want an empty directory or no file", target)
	}
	return false, nil
}
