package memfs

import (
	"errors"
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// mountFlags are the flags of every instance: a pod must never be able to
// use the tree to gain privileges or reach devices.
const mountFlags = unix.MS_NOSUID | unix.MS_NODEV

var zeroUmask sync.Once

// ErrNotInstance is the error of Open for a directory that is not the root
// of a tmpfs instance New could have mounted: a plain directory (the
// instance is gone, as after a reboot), another file system, a directory
// inside an instance, or a tmpfs mounted without nosuid and nodev.
var ErrNotInstance = errors.New("not a memfs tmpfs instance")

// New mounts a fresh tmpfs instance with opts' limits on dir (created if
// missing; it must be empty) and returns the Layer serving it.
//
// memfs applies modes exactly as callers give them, so New sets the
// process umask to 0 (memfs applies the requesting process's umask
// itself, vfs.Caller.Umask, where no default ACL takes its place).
func New(dir string, opts Options) (*Layer, error) {
	opts, err := prepare(opts)
	if err != nil {
		return nil, err
	}
	if err := os.MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("memfs: %w", err)
	}
	if entries, err := os.ReadDir(dir); err != nil {
		return nil, fmt.Errorf("memfs: %w", err)
	} else if len(entries) > 0 {
		return nil, fmt.Errorf("memfs: %s is not empty", dir)
	}
	if err := unix.Mount("memfs", dir, "tmpfs", mountFlags, tmpfsData(opts)); err != nil {
		return nil, fmt.Errorf("memfs: mount tmpfs on %s: %w", dir, err)
	}
	rootFd, err := openRoot(dir)
	if err == nil {
		var l *Layer
		if l, err = serve(dir, rootFd, opts); err == nil {
			return l, nil
		}
	}
	unix.Unmount(dir, unix.MNT_DETACH)
	return nil, err
}

// Open serves the instance that New mounted on dir earlier, possibly in a
// process that has since exited, as it is: Open neither remounts nor
// empties it. opts must be the limits the instance was last mounted or
// resized with (Open does not compare them with the instance; StatFS
// reports the instance's own). Open sets the umask as New does.
//
// Open refuses, with an error wrapping ErrNotInstance, a dir that is not
// the root of a tmpfs mount (checked on the directory it opens, so a
// concurrent mount or rename cannot slip another one in), a tmpfs whose
// root is not an instance's root (a bind mount of a subdirectory), and a
// tmpfs mounted without nosuid and nodev.
func Open(dir string, opts Options) (*Layer, error) {
	opts, err := prepare(opts)
	if err != nil {
		return nil, err
	}
	rootFd, err := openRoot(dir)
	if err != nil {
		return nil, err
	}
	if err := checkInstance(rootFd); err != nil {
		unix.Close(rootFd)
		return nil, fmt.Errorf("memfs: %s: %w", dir, err)
	}
	return serve(dir, rootFd, opts)
}

// prepare validates opts, fills in their defaults and zeroes the umask.
func prepare(opts Options) (Options, error) {
	if opts.Size <= 0 {
		return opts, fmt.Errorf("memfs: size must be positive, got %d", opts.Size)
	}
	zeroUmask.Do(func() { unix.Umask(0) })
	return opts.withDefaults(), nil
}

// openRoot opens the directory dir, which is or will be an instance's root.
func openRoot(dir string) (int, error) {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, fmt.Errorf("memfs: open %s: %w", dir, err)
	}
	return fd, nil
}

// serve returns the Layer of the instance whose root directory is open as
// rootFd, which it consumes, registering the root. Nothing is unmounted on
// failure.
func serve(dir string, rootFd int, opts Options) (*Layer, error) {
	l := &Layer{
		dir:    dir,
		rootFd: rootFd,
		opts:   opts,
		inodes: map[uint64]*inode{},
	}
	if err := l.initRoot(); err != nil {
		// initRoot has registered nothing: only rootFd is open.
		unix.Close(rootFd)
		return nil, fmt.Errorf("memfs: %s: %w", dir, err)
	}
	// What the instance's size falls short of opts.Size is kept for
	// metadata (see usage.go).
	var st unix.Statfs_t
	if err := unix.Fstatfs(rootFd, &st); err != nil {
		l.Detach()
		return nil, fmt.Errorf("memfs: %s: %w", dir, err)
	}
	l.reserved.Store(max(0, roundUp(opts.Size, pageSize)-int64(st.Blocks)*int64(st.Bsize)))
	return l, nil
}

// checkInstance says whether the directory open as fd is the root of a
// tmpfs instance mounted with mountFlags: its root inode, at the root of a
// mount.
func checkInstance(fd int) error {
	var sfs unix.Statfs_t
	if err := unix.Fstatfs(fd, &sfs); err != nil {
		return err
	}
	if sfs.Type != unix.TMPFS_MAGIC {
		return fmt.Errorf("%w: file system type %#x is not tmpfs", ErrNotInstance, sfs.Type)
	}
	root, err := isMountRoot(fd)
	if err != nil {
		return err
	}
	if !root {
		return fmt.Errorf("%w: not the root of a mount", ErrNotInstance)
	}
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return err
	}
	if st.Ino != vfs.RootIno {
		return fmt.Errorf("%w: a mount of a directory inside an instance (inode %d)", ErrNotInstance, st.Ino)
	}
	if sfs.Flags&(unix.ST_NOSUID|unix.ST_NODEV) != unix.ST_NOSUID|unix.ST_NODEV {
		return fmt.Errorf("%w: mounted without nosuid,nodev", ErrNotInstance)
	}
	return nil
}

// isMountRoot says whether the directory open as fd is the root of a mount:
// statx's STATX_ATTR_MOUNT_ROOT (Linux >= 5.8), else whether ".." (which
// leaves a mount root for the directory it is mounted on) is on another
// device.
func isMountRoot(fd int) (bool, error) {
	var stx unix.Statx_t
	if err := unix.Statx(fd, "", unix.AT_EMPTY_PATH, 0, &stx); err != nil {
		return false, err
	}
	if stx.Attributes_mask&unix.STATX_ATTR_MOUNT_ROOT != 0 {
		return stx.Attributes&unix.STATX_ATTR_MOUNT_ROOT != 0, nil
	}
	var st, parent unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil {
		return false, err
	}
	if err := unix.Fstatat(fd, "..", &parent, unix.AT_SYMLINK_NOFOLLOW); err != nil {
		return false, err
	}
	return st.Dev != parent.Dev, nil
}

func tmpfsData(o Options) string {
	data := fmt.Sprintf("size=%d,nr_inodes=%d,inode64,mode=0755", o.Size, o.Inodes)
	if o.NoSwap {
		data += ",noswap"
	}
	return data
}

// Resize changes the instance's limits. Shrinking below what is in use
// (data and the metadata charge, see StatFS) fails with EINVAL, as tmpfs
// does, and changes nothing.
func (l *Layer) Resize(size int64, inodes uint64) error {
	if size <= 0 {
		return syscall.EINVAL
	}
	l.limitsMu.Lock()
	defer l.limitsMu.Unlock()
	l.mu.Lock()
	o := l.opts
	l.mu.Unlock()
	o.Size, o.Inodes = size, inodes
	o = o.withDefaults()
	if err := l.remountLocked(o, l.reserved.Load()); err != nil {
		return err
	}
	l.mu.Lock()
	l.opts = o
	l.mu.Unlock()
	return nil
}

// Detach drops every cached descriptor and the inode table but leaves the
// instance mounted, for another process to Open: the Layer is unusable
// after.
func (l *Layer) Detach() {
	l.mu.Lock()
	for _, ino := range l.inodes {
		ino.closeFdLocked(l)
	}
	l.inodes = nil
	l.mu.Unlock()
	if l.rootFd >= 0 {
		unix.Close(l.rootFd)
		l.rootFd = -1
	}
}

// Close drops every cached descriptor and detaches the instance, which frees
// its memory once no file in it is open anywhere. The mountpoint directory
// is removed.
func (l *Layer) Close() error {
	l.Detach()
	if err := unix.Unmount(l.dir, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("memfs: unmount %s: %w", l.dir, err)
	}
	if err := os.Remove(l.dir); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("memfs: %w", err)
	}
	return nil
}
