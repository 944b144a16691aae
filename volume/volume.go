// Package volume builds, serves and tears down one csi-memfs volume: a
// memory layer (memfs), the read-only lower directory beneath it if any
// (an overlay), and the FUSE server (fusefs) that serves the tree on a
// target directory. It is the one place that knows how these parts are
// assembled and in which order they are let go of; the CSI driver
// (publish, and the takeover of a previous process's volumes) and the
// `csi-memfs mount` command both build their volumes here.
//
// # Life of a volume
//
//	Build    mounts a fresh memory layer on Config.Upper, lays it over
//	         Config.Lower, sets up the root directory and seals the files
//	         Config.Seal matches; nothing is served yet
//	Mount    mounts the tree over FUSE on Config.Target and serves it
//	Adopt    instead of Build and Mount: serves again, from a Session, a
//	         volume another process served, its memory layer still
//	         mounted on Config.Upper
//	Unmount  unmounts the target and stops serving
//	Disconnect  stops serving and ends the connection, for a target that
//	         no longer holds the mount
//	Stop     stops serving without unmounting anything, for a successor
//	         process to Adopt the Session returned
//	Close    unmounts if still served, and frees the memory layer
//
// A step that fails undoes what the call did before it: Build and Adopt
// return nothing half made. The caller owns Config.Lower: it must stay
// until Close or Stop.
//
// # Concurrency
//
// A Volume has no lock of its own. Usage, SealViolations, Panics,
// Passthrough, PassthroughWanted, KernelResend and Transport may run
// concurrently with each other; Mount, Unmount, Disconnect, Stop
// and Close must not run concurrently with any other method. The driver
// holds its per-volume lock for that.
package volume

import (
	"errors"
	"fmt"
	"os"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/fusefs"
	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// Config describes a volume.
type Config struct {
	// ID names the volume: its mount's source is Source(ID) unless
	// FsName is set.
	ID string
	// FsName, if set, is the mount's source instead of Source(ID).
	FsName string
	// Subtype, if set, makes the mount's type "fuse.Subtype" instead of
	// "fuse.memfs".
	Subtype string
	// Upper is the mount point of the volume's memory layer, a private
	// tmpfs instance never shown to a pod: Build creates and mounts it,
	// Adopt finds it mounted.
	Upper string
	// Size is the byte limit of the memory layer.
	Size int64
	// Inodes is the inode limit of the memory layer; 0: one per 4 KiB of
	// Size, at least 1024.
	Inodes uint64
	// NoSwap keeps the memory layer's pages out of swap (Linux 6.4 and
	// later; Build fails with EINVAL where the kernel refuses it).
	NoSwap bool
	// Fds is the descriptor budget the memory layers of the process share;
	// nil: a budget of 1024 for this volume alone.
	Fds *FdBudget
	// Lower is a directory served read-only beneath the memory layer:
	// the volume starts with its tree, and what changes is copied up.
	// Empty for a pure memory volume.
	Lower string

	// SharedRoot has Build make the root directory writable by the
	// volume's users: with a MountGroup, group-owned by it and
	// group-writable with set-group-ID (02775), as CSI's
	// VOLUME_MOUNT_GROUP asks; without, writable by everyone (0777), like
	// an emptyDir. Without SharedRoot the root keeps the mode the memory
	// layer or the lower directory gives it.
	SharedRoot bool
	// MountGroup is the gid that owns a SharedRoot; nil for none.
	MountGroup *uint32
	// Seal lists globs (path.Match syntax, slash-separated, relative to
	// the root): Build seals every regular file matching one (write,
	// grow, shrink and seal). They match the files of Lower: sealing one
	// copies up its metadata only.
	Seal []string

	// Target is the directory the volume is mounted on. It must exist,
	// and be empty, when Mount is called.
	Target string
	// ReadOnly mounts the volume read-only.
	ReadOnly bool
	// KernelCache, with ReadOnly, has the kernel open the volume's files
	// without asking this process and keep what was read in its page
	// cache across opens (fusefs.Options.NoOpen): a file read again costs
	// no FUSE request, and what was read is cached twice (above the
	// memory layer's or lower file's own pages). Ignored without
	// ReadOnly.
	KernelCache bool
	// DisablePassthrough serves every read and write through this
	// process.
	DisablePassthrough bool
	// Transport is how FUSE requests reach this process: "auto" (or
	// empty), "io-uring" or "dev-fuse" (CheckTransport). A volume served
	// over io_uring cannot be handed to another process, so auto uses the
	// ring only with NoHandover, and with "io-uring" a restart of the
	// serving process loses the volume (docs/restart.md).
	Transport string
	// NoHandover says the volume will never be served by another
	// process (Stop, Adopt), as for `csi-memfs mount`.
	NoHandover bool
	// Observer, if set, is told of every FUSE request served.
	Observer fusefs.Observer
	// Debug logs every FUSE request (very verbose).
	Debug bool
}

// CheckTransport checks a Config.Transport value.
func CheckTransport(s string) error {
	_, err := fusefs.ParseTransport(s)
	return err
}

// Source returns the source a volume's mount shows in /proc/mounts:
// "csi-memfs:ID", or "csi-memfs" for an empty id.
func Source(id string) string {
	if id == "" {
		return "csi-memfs"
	}
	return "csi-memfs:" + id
}

// FdBudget is a number of descriptors the memory layers of a process's
// volumes may keep cached between them, so that many volumes stay within
// the process's open-file limit. It is safe for concurrent use.
type FdBudget struct {
	// fds is the memory layers' budget. Immutable.
	fds *memfs.FdBudget
}

// NewFdBudget returns a budget of n descriptors.
func NewFdBudget(n int) *FdBudget { return &FdBudget{fds: memfs.NewFdBudget(n)} }

// ProcessFdBudget returns the budget a process serving volumes gives their
// memory layers: half its open-file limit (Go raises the soft limit to the
// hard one at start), leaving the rest to open files, sockets, the FUSE
// devices and the image cache. An inode without a cached descriptor costs
// an open_by_handle_at and a close on each request that reaches it
// (BENCHMARKS.md, "Descriptors").
func ProcessFdBudget() *FdBudget {
	var rl unix.Rlimit
	if err := unix.Getrlimit(unix.RLIMIT_NOFILE, &rl); err != nil || rl.Cur > 1<<20 {
		return NewFdBudget(1 << 19)
	}
	return NewFdBudget(int(rl.Cur / 2))
}

// memfs returns the budget to give memfs; nil for none.
func (b *FdBudget) memfs() *memfs.FdBudget {
	if b == nil {
		return nil
	}
	return b.fds
}

// Volume is one volume: its memory layer, the lower directory beneath it
// if any, and the server that serves them. See the package doc for its
// life and for which methods may run concurrently.
type Volume struct {
	// cfg is the volume's configuration. Immutable.
	cfg Config
	// layer is the memory layer. Immutable pointer; after Close or Stop
	// only its counters may be read.
	layer *memfs.Layer
	// lower is Config.Lower opened as an overlay Lower; nil for a pure
	// memory volume and once closed.
	lower *overlay.DirLower
	// ov is the overlay of layer over lower; nil for a pure memory volume
	// and once closed.
	ov *overlay.FS
	// server serves the tree on cfg.Target; nil until Mount or Adopt, and
	// once unmounted or stopped.
	server *fusefs.Server
	// panics counts the handler panics of servers already let go of;
	// forced says the last Unmount had to end a connection that open
	// files kept busy.
	panics uint64
	forced bool
	// stopped is set by Stop: the parts are let go of, the memory layer
	// left mounted for a successor.
	stopped bool
}

// tree returns the tree the volume serves: the memory layer alone, or the
// overlay of it over the lower directory. It is the one place a volume's
// parts become a vfs.FS.
func (v *Volume) tree() vfs.FS {
	if v.ov != nil {
		return v.ov
	}
	return v.layer
}

// fuseOptions are the options of the volume's FUSE server; Mount and Adopt
// must use the same.
func (v *Volume) fuseOptions() fusefs.Options {
	name := v.cfg.FsName
	if name == "" {
		name = Source(v.cfg.ID)
	}
	return fusefs.Options{
		FsName:             name,
		Subtype:            v.cfg.Subtype,
		ReadOnly:           v.cfg.ReadOnly,
		NoOpen:             v.cfg.ReadOnly && v.cfg.KernelCache,
		DisablePassthrough: v.cfg.DisablePassthrough,
		Transport:          fusefs.Transport(v.cfg.Transport),
		NoHandover:         v.cfg.NoHandover,
		Observer:           v.cfg.Observer,
		Debug:              v.cfg.Debug,
	}
}

// layerOptions are the options of the volume's memory layer.
func (c *Config) layerOptions() memfs.Options {
	return memfs.Options{Size: c.Size, Inodes: c.Inodes, NoSwap: c.NoSwap, Fds: c.Fds.memfs()}
}

// Build mounts a fresh memory layer on cfg.Upper, lays it over cfg.Lower,
// sets up the root directory (cfg.SharedRoot) and seals the files cfg.Seal
// matches. The volume is not served until Mount. A file that cannot be
// sealed fails Build with a *SealError. On failure nothing is left
// mounted.
func Build(cfg Config) (*Volume, error) {
	layer, err := memfs.New(cfg.Upper, cfg.layerOptions())
	if err != nil {
		return nil, fmt.Errorf("memory layer: %w", err)
	}
	v, err := assemble(cfg, layer)
	if err != nil {
		undo(cfg.ID, layer.Close())
		return nil, err
	}
	if cfg.SharedRoot {
		if err := v.initRoot(); err != nil {
			undo(cfg.ID, v.Close())
			return nil, fmt.Errorf("root directory: %w", err)
		}
	}
	if err := v.sealMatching(); err != nil {
		undo(cfg.ID, v.Close())
		return nil, &SealError{Err: err}
	}
	return v, nil
}

// undo logs a failure to undo a step of a failed Build or Adopt.
func undo(id string, err error) {
	if err != nil {
		klog.ErrorS(err, "Undoing a failed volume build", "volumeID", id)
	}
}

// assemble opens cfg.Lower and lays layer over it. On failure it closes
// what it opened, but not layer.
func assemble(cfg Config, layer *memfs.Layer) (*Volume, error) {
	v := &Volume{cfg: cfg, layer: layer}
	if cfg.Lower == "" {
		return v, nil
	}
	lower, err := overlay.NewDirLower(cfg.Lower)
	if err != nil {
		return nil, fmt.Errorf("lower directory %s: %w", cfg.Lower, err)
	}
	ov, err := overlay.New(layer, lower)
	if err != nil {
		undo(cfg.ID, lower.Close())
		return nil, fmt.Errorf("overlay over %s: %w", cfg.Lower, err)
	}
	v.lower, v.ov = lower, ov
	return v, nil
}

// Mount mounts the volume on Config.Target and serves it.
func (v *Volume) Mount() error {
	if v.server != nil || v.stopped {
		return errors.New("volume: mount: already served, or stopped")
	}
	srv, err := fusefs.Mount(v.cfg.Target, v.tree(), v.fuseOptions())
	if err != nil {
		return err
	}
	v.server = srv
	return nil
}

// Adopt serves again a volume that another process served on cfg.Target
// (Stop, or a crash), from its session s, which Adopt takes over: the
// memory layer still mounted on cfg.Upper and cfg.Lower make the same tree
// again. With resend, the other process died and the kernel sends again
// what it never answered. cfg must describe the volume as the other
// process had it; SharedRoot, MountGroup and Seal are not applied again.
// On failure the memory layer stays mounted and s is closed.
func Adopt(cfg Config, s Session, resend bool) (*Volume, error) {
	layer, err := memfs.Open(cfg.Upper, cfg.layerOptions())
	if err != nil {
		s.Close()
		return nil, fmt.Errorf("memory layer: %w", err)
	}
	v, err := assemble(cfg, layer)
	if err != nil {
		layer.Detach()
		s.Close()
		return nil, err
	}
	srv, err := fusefs.Adopt(cfg.Target, s.s, v.tree(), v.fuseOptions(), resend)
	if err != nil {
		undo(cfg.ID, v.closeTree())
		layer.Detach()
		return nil, err
	}
	v.server = srv
	return v, nil
}

// Unmount unmounts the volume from Config.Target (detaching it if busy)
// and waits until serving has ended. A volume not served is left as it
// is.
func (v *Volume) Unmount() error {
	if v.server == nil {
		return nil
	}
	if err := v.server.Unmount(); err != nil {
		return err
	}
	v.forced = v.server.Forced()
	v.dropServer()
	return nil
}

// dropServer lets go of the server, keeping its panic count.
func (v *Volume) dropServer() {
	v.panics += v.server.Panics()
	v.server = nil
}

// Forced says whether the last Unmount ended the volume's connection
// while files on it were still open (they get errors from then on).
func (v *Volume) Forced() bool { return v.forced }

// Panics counts the FUSE requests on the volume whose handler panicked
// (each was answered EIO). It may be read after Close and Stop.
func (v *Volume) Panics() uint64 {
	n := v.panics
	if v.server != nil {
		n += v.server.Panics()
	}
	return n
}

// Disconnect stops serving the volume and ends its FUSE connection
// without touching Config.Target: for a target that no longer holds the
// volume's mount (unmounted or removed from outside, or replaced). Wherever
// the mount still is (detached while busy), it answers ENOTCONN once the
// last copy of the session (a holder's) is closed. A volume not served is
// left as it is.
func (v *Volume) Disconnect() {
	if v.server == nil {
		return
	}
	// Stop fails only when the connection has ended already.
	s, _ := v.server.Stop()
	s.Close()
	v.dropServer()
}

// Wait blocks until the volume's mount has ended: unmounted by Unmount or
// from outside, or Stop.
func (v *Volume) Wait() {
	if v.server != nil {
		v.server.Wait()
	}
}

// Stop stops serving the volume without unmounting anything, and lets go
// of it: requests read are answered, later ones wait in the kernel for
// whoever Adopts the Session returned; the memory layer stays mounted on
// Config.Upper. The Volume is done with after, even when Stop fails.
func (v *Volume) Stop() (Session, error) {
	if v.server == nil || v.stopped {
		return Session{}, errors.New("volume: stop: not served")
	}
	s, err := v.server.Stop()
	v.dropServer()
	v.stopped = true
	undo(v.cfg.ID, v.closeTree())
	v.layer.Detach()
	return Session{s: s}, err
}

// Close unmounts the volume if it is still served, then frees it: the
// overlay, the lower directory, and the memory layer, whose memory is
// released once no file in it is open anywhere. Close may be called again
// after a failure; after Stop it does nothing.
func (v *Volume) Close() error {
	if v.stopped {
		return nil
	}
	if err := v.Unmount(); err != nil {
		return err
	}
	lowerErr := v.closeTree()
	if err := v.layer.Close(); err != nil {
		return err
	}
	if lowerErr != nil {
		return fmt.Errorf("lower directory: %w", lowerErr)
	}
	return nil
}

// closeTree closes the overlay, then the lower directory. Each is closed
// once, however often closeTree is called.
func (v *Volume) closeTree() error {
	if v.ov != nil {
		v.ov.Close()
		v.ov = nil
	}
	if v.lower == nil {
		return nil
	}
	err := v.lower.Close()
	v.lower = nil
	return err
}

// Passthrough says whether the volume's file data moves by FUSE
// passthrough; false when it is not served.
func (v *Volume) Passthrough() bool {
	return v.server != nil && v.server.Passthrough()
}

// Transport says how the volume's requests reach this process,
// "io-uring" or "dev-fuse"; empty when it is not served.
func (v *Volume) Transport() string {
	if v.server == nil {
		return ""
	}
	return string(v.server.Transport())
}

// PassthroughWanted says whether the volume asks for FUSE passthrough
// (Config.DisablePassthrough is false); Passthrough, whether it has it.
func (v *Volume) PassthroughWanted() bool { return !v.cfg.DisablePassthrough }

// KernelResend says whether the kernel can resend the requests of a
// server that died (fusefs.Server.KernelResend); false when unknown.
func (v *Volume) KernelResend() bool {
	return v.server != nil && v.server.KernelResend()
}

// SealViolations counts the operations on the volume refused because a
// file was sealed. It may be read after Close and Stop.
func (v *Volume) SealViolations() uint64 { return v.layer.SealViolations() }

// RemoveUpper detaches a memory layer that no Volume serves (one a
// previous process left mounted on dir) and removes dir. Its memory is
// released once no file in it is open anywhere. A missing dir is success.
func RemoveUpper(dir string) error {
	for {
		err := unix.Unmount(dir, unix.MNT_DETACH)
		if err == unix.EINVAL || err == unix.ENOENT {
			break // not (or no longer) a mount point
		}
		if err != nil {
			return fmt.Errorf("unmount memory layer %s: %w", dir, err)
		}
	}
	if err := os.Remove(dir); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("memory layer %s: %w", dir, err)
	}
	return nil
}
