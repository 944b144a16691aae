package memfs

import (
	"fmt"
	"os"
	"sync"
	"syscall"

	"golang.org/x/sys/unix"
)

// mountFlags are the flags of every instance: a pod must never be able to
// use the tree to gain privileges or reach devices.
const mountFlags = unix.MS_NOSUID | unix.MS_NODEV

var zeroUmask sync.Once

// New mounts a fresh tmpfs instance with opts' limits on dir (created if
// missing; it must be empty) and returns the Layer serving it.
//
// memfs applies modes exactly as callers give them, so New sets the
// process umask to 0 (callers above memfs, like the FUSE kernel module,
// apply the requesting process's umask themselves).
func New(dir string, opts Options) (*Layer, error) {
	if opts.Size <= 0 {
		return nil, fmt.Errorf("memfs: size must be positive, got %d", opts.Size)
	}
	opts = opts.withDefaults()
	zeroUmask.Do(func() { unix.Umask(0) })

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
	rootFd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		unix.Unmount(dir, unix.MNT_DETACH)
		return nil, fmt.Errorf("memfs: open %s: %w", dir, err)
	}
	l := &Layer{
		dir:    dir,
		rootFd: rootFd,
		opts:   opts,
		inodes: map[uint64]*inode{},
	}
	if err := l.initRoot(); err != nil {
		l.Close()
		return nil, fmt.Errorf("memfs: %w", err)
	}
	return l, nil
}

func tmpfsData(o Options) string {
	return fmt.Sprintf("size=%d,nr_inodes=%d,inode64,mode=0755", o.Size, o.Inodes)
}

// Resize changes the instance's limits. Shrinking below what is in use fails
// with EINVAL, as tmpfs does, and changes nothing.
func (l *Layer) Resize(size int64, inodes uint64) error {
	if size <= 0 {
		return syscall.EINVAL
	}
	l.mu.Lock()
	defer l.mu.Unlock()
	o := l.opts
	o.Size, o.Inodes = size, inodes
	o = o.withDefaults()
	if err := unix.Mount("", l.dir, "", unix.MS_REMOUNT|mountFlags, tmpfsData(o)); err != nil {
		return Errno(err)
	}
	l.opts = o
	return nil
}

// Close drops every cached descriptor and detaches the instance, which frees
// its memory once no file in it is open anywhere. The mountpoint directory
// is removed.
func (l *Layer) Close() error {
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
	if err := unix.Unmount(l.dir, unix.MNT_DETACH); err != nil && err != unix.EINVAL {
		return fmt.Errorf("memfs: unmount %s: %w", l.dir, err)
	}
	if err := os.Remove(l.dir); err != nil && !os.IsNotExist(err) {
		return fmt.Errorf("memfs: %w", err)
	}
	return nil
}

// StatFS reports the instance's statfs: the block and inode limits and what
// is free, exactly as df shows them.
func (l *Layer) StatFS() (unix.Statfs_t, error) {
	var st unix.Statfs_t
	err := unix.Fstatfs(l.rootFd, &st)
	return st, Errno(err)
}
