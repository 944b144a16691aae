package image

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/go-containerregistry/pkg/authn"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"golang.org/x/sync/singleflight"
	"golang.org/x/sys/unix"
)

// Config configures a Cache. Only Dir is required.
type Config struct {
	// Dir is the cache directory (created 0700 if missing). It holds
	// images/<algorithm>-<hex>/rootfs trees, refs.json and tmp/. One Cache
	// at a time may use it (an flock on Dir/lock).
	Dir string
	// Budget is the size in bytes (disk usage of the flattened trees) the
	// cache keeps itself under by collecting least recently used images
	// that no volume uses. Images in use are never collected, so the cache
	// may exceed Budget while they are. An image whose compressed layers
	// alone exceed Budget is refused (ErrCacheFull), and so is one whose
	// flattening writes more than Budget bytes of file contents
	// (ErrTooLarge, as soon as it does). 0 means no limit.
	Budget int64
	// DiskReserve is the free space flattening leaves on the disk under
	// Dir: a pull stops (ErrTooLarge) before the disk's available bytes
	// fall under it, whatever Budget says. 0 means the smaller of 1 GiB
	// and 5% of the filesystem; negative means no reserve.
	DiskReserve int64
	// MaxFiles bounds the entries of one image: tar headers of all its
	// layers and the directories made for them (ErrTooLarge). 0 means
	// DefaultMaxFiles; negative means no limit.
	MaxFiles int64
	// MaxPathLength bounds the length in bytes of an entry's name and link
	// target in a layer (ErrTooLarge). 0 means DefaultMaxPathLength;
	// negative means no limit (the kernel still refuses names over 255
	// bytes and paths over 4095).
	MaxPathLength int
	// AllowedRegistries, if not empty, lists the only registries ("host"
	// or "host:port"; "docker.io" for Docker Hub) images are pulled from,
	// with InsecureRegistries. A registry listed here may be at any
	// address, loopback and link-local included; redirects (to blob
	// storage) may go to other hosts, not to such addresses.
	AllowedRegistries []string
	// InsecureRegistries lists registries ("host" or "host:port") that may
	// be spoken to over plain HTTP, and may be at any address; no other
	// ever is, loopback registries included. Every registry not listed
	// here or in AllowedRegistries must resolve to addresses that are not
	// loopback, link-local, unspecified or cloud metadata ones (see
	// transport.go).
	InsecureRegistries []string
	// CAFile, if set, is a PEM file of CA certificates trusted for
	// registry TLS besides the system's roots (which SSL_CERT_FILE and
	// SSL_CERT_DIR select, and which are the fallback roots a program
	// registered when the system has none).
	CAFile string
	// NodeDockerConfigs is the search list of the node's docker config
	// files (config.json, {"auths": {...}}, or a legacy .dockercfg), as
	// kubelet's /var/lib/kubelet/config.json, ~/.docker/config.json and
	// .dockercfg: the first that exists gives credentials for registries
	// the volume's own Keychain has none for. It is read again when it
	// changes; credsStore and credHelpers are ignored. Empty: none.
	NodeDockerConfigs []string
	// CredentialProviderConfig, if set, is a kubelet CredentialProviderConfig
	// file (YAML or JSON, kubelet's --image-credential-provider-config)
	// naming exec plugins in CredentialProviderBinDir (kubelet's
	// --image-credential-provider-bin-dir) asked for credentials after
	// NodeDockerConfigs (see credprovider.go).
	CredentialProviderConfig string
	CredentialProviderBinDir string
	// Mirrors maps a registry ("host" or "host:port"; "docker.io" for
	// Docker Hub) to mirrors ("host[:port]") tried in order before it;
	// the registry itself is tried when every mirror fails. Mirrors are
	// subject to AllowedRegistries and InsecureRegistries like any
	// registry (checked by NewCache).
	Mirrors map[string][]string
	// Logger gets what no error can carry: failures of credential
	// provider plugins and of the node's docker config (never a
	// credential), and mirrors that failed. The zero Logger discards.
	Logger logr.Logger
	// LocalPrefix, if set, marks references to local images: PREFIX NAME,
	// PREFIX NAME:TAG or PREFIX NAME@DIGEST name the OCI image layout
	// directory or image tarball (docker save format) LocalDir/NAME (or
	// LocalDir/NAME.tar). NAME is one or more slash-separated elements of
	// [A-Za-z0-9][A-Za-z0-9._-]*, so it can only ever name something under
	// LocalDir. Example: LocalPrefix "oci:/var/lib/csi-memfs/images/" with
	// LocalDir "/var/lib/csi-memfs/images", or LocalPrefix "oci:".
	LocalPrefix string
	LocalDir    string
	// Platform is the platform multi-platform indexes are resolved to, as
	// "os/arch[/variant]". Empty means linux/runtime.GOARCH.
	Platform string
	// Transport is the HTTP transport to registries; nil means a clone of
	// go-containerregistry's remote.DefaultTransport (proxies from the
	// environment). An *http.Transport is cloned and gets the address
	// check on its dialer and CAFile; any transport is wrapped so that
	// plain HTTP goes only where InsecureRegistries allows.
	Transport http.RoundTripper
	// Progress, if set, is called from the pulling goroutine every
	// ProgressInterval while a pull runs (not for pulls faster than that).
	Progress func(Progress)
	// ProgressInterval defaults to 5s.
	ProgressInterval time.Duration
	// StallTimeout fails a pull (ErrUnavailable) that has received no byte
	// for this long. Defaults to 2m.
	StallTimeout time.Duration
	// PullTimeout bounds one pull, which runs on after the Get that started
	// it returns. Defaults to 1h.
	PullTimeout time.Duration
	// OnPull, if set, is called once for every pull attempt that reached
	// the source, with its result, duration and bytes (for metrics).
	OnPull func(PullEvent)
	// NoSync skips the syncfs before a new tree is renamed into place.
	// Only for tests and benchmarks: a crash may then leave a tree with
	// lost file contents.
	NoSync bool
}

// Defaults of Config's per-image limits.
const (
	// DefaultMaxFiles is the default Config.MaxFiles: about five times
	// the entries of the largest common images.
	DefaultMaxFiles = 1 << 20
	// DefaultMaxPathLength is the default Config.MaxPathLength: the
	// kernel's PATH_MAX.
	DefaultMaxPathLength = 4096
)

// PullPolicy says when Get contacts the image's source.
type PullPolicy int

const (
	// PullIfNotPresent uses a cached image for the reference if there is
	// one, and pulls otherwise. The zero value.
	PullIfNotPresent PullPolicy = iota
	// PullAlways resolves the reference at the source every time, with the
	// caller's credentials (so an image cached by one pod is not handed to
	// another without access), and pulls only if the digest is not cached.
	PullAlways
	// PullNever uses the cache only; a missing image is ErrNotFound.
	PullNever
)

func (p PullPolicy) String() string {
	switch p {
	case PullIfNotPresent:
		return "IfNotPresent"
	case PullAlways:
		return "Always"
	case PullNever:
		return "Never"
	}
	return fmt.Sprintf("PullPolicy(%d)", int(p))
}

// ParsePullPolicy parses a Kubernetes imagePullPolicy value; "" is
// IfNotPresent.
func ParsePullPolicy(s string) (PullPolicy, error) {
	switch s {
	case "", "IfNotPresent":
		return PullIfNotPresent, nil
	case "Always":
		return PullAlways, nil
	case "Never":
		return PullNever, nil
	}
	return 0, fmt.Errorf("%w: imagePullPolicy %q: want Always, IfNotPresent or Never", ErrInvalidArgument, s)
}

// Progress describes a running pull.
type Progress struct {
	Ref    string
	Digest string
	// Layer is the index (from 0) of the layer being fetched, of Layers.
	Layer, Layers int
	// Bytes of TotalBytes (compressed layer sizes) fetched so far.
	Bytes, TotalBytes int64
	Elapsed           time.Duration
}

// PullResult is the outcome of a pull, for metrics labels.
type PullResult string

// Pull results. ResultOf maps an error to one.
const (
	ResultSuccess      PullResult = "success"
	ResultInvalid      PullResult = "invalid"
	ResultNotFound     PullResult = "not_found"
	ResultUnauthorized PullResult = "unauthorized"
	ResultUnavailable  PullResult = "unavailable"
	ResultCorrupt      PullResult = "corrupt"
	ResultUnsafe       PullResult = "unsafe"
	ResultCacheFull    PullResult = "cache_full"
	ResultCanceled     PullResult = "canceled"
	ResultError        PullResult = "error"
)

// ResultOf returns the PullResult for an error from Get.
func ResultOf(err error) PullResult {
	switch {
	case err == nil:
		return ResultSuccess
	case errors.Is(err, ErrInvalidArgument):
		return ResultInvalid
	case errors.Is(err, ErrNotFound):
		return ResultNotFound
	case errors.Is(err, ErrUnauthorized):
		return ResultUnauthorized
	case errors.Is(err, ErrUnavailable), errors.Is(err, ErrClosed):
		return ResultUnavailable
	case errors.Is(err, ErrCorrupt):
		return ResultCorrupt
	case errors.Is(err, ErrUnsafe):
		return ResultUnsafe
	case errors.Is(err, ErrCacheFull):
		return ResultCacheFull
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return ResultCanceled
	}
	return ResultError
}

// PullEvent reports one finished pull attempt to Config.OnPull.
type PullEvent struct {
	Ref    string
	Digest string // empty if the reference did not resolve
	Result PullResult
	// Duration of the attempt; Bytes fetched (compressed).
	Duration time.Duration
	Bytes    int64
	Err      error
}

// Stats is a snapshot of the cache for metrics.
type Stats struct {
	// Images and Bytes (disk usage) held; Pinned of them are in use.
	Images, Pinned int
	Bytes          int64
	Budget         int64
	// InFlight pulls now.
	InFlight int
	// Hits counts Gets answered from the cache without a pull.
	Hits uint64
	// Pulls counts pull attempts by result; PullBytes and PullSeconds add
	// up their bytes fetched and durations.
	Pulls       map[PullResult]uint64
	PullBytes   int64
	PullSeconds float64
	// Evictions counts images collected.
	Evictions uint64
}

// Image is a flattened image pinned in the cache: it is not collected
// until Release is called.
type Image struct {
	// Ref is the reference as the cache indexes it (normalized).
	Ref string
	// Digest is the manifest digest, "sha256:...".
	Digest string
	// Root is the directory holding the image's file tree. It is
	// read-only by contract: nothing may modify it.
	Root string
	// Size is the tree's disk usage in bytes.
	Size int64

	c    *Cache
	e    *entry
	once sync.Once
}

// Release unpins the image. It may be called more than once.
func (img *Image) Release() {
	img.once.Do(func() { img.c.release(img.e) })
}

// entry is one image in the cache.
type entry struct {
	// digest ("sha256:hex"), dir (images/<algorithm>-<hex>), size and
	// inodes are immutable.
	digest string
	dir    string
	size   int64
	inodes int64
	// pins counts unreleased Images. Protected by Cache.mu.
	pins int
	// lastUsed orders collection. Protected by Cache.mu.
	lastUsed time.Time
	// gone is set once the entry is collected. Protected by Cache.mu.
	gone bool
	// public is meta.json's Public, as loaded. Immutable.
	public bool
}

// meta is the on-disk record of an entry (images/<name>/meta.json).
type meta struct {
	Digest  string    `json:"digest"`
	Size    int64     `json:"size"`
	Inodes  int64     `json:"inodes"`
	Ref     string    `json:"ref"`
	Created time.Time `json:"created"`
	// Public records that the source gave the image without credentials,
	// so anyone may use it after a restart too (see access.go).
	Public bool `json:"public,omitempty"`
}

// Cache is a node-wide cache of flattened images. All methods are safe for
// concurrent use.
//
// Lock order: Cache.mu is a leaf lock; no I/O but small metadata writes
// (refs.json, renames) happens under it.
type Cache struct {
	// cfg, platform, policy, transport, retry, dirs are immutable after
	// NewCache.
	cfg       Config
	platform  v1.Platform
	policy    *registryPolicy
	transport http.RoundTripper
	retry     remote.Backoff
	// nodeCreds are the node's credential sources, in order (see
	// nodecreds.go); mirrors maps a normalized registry to its mirrors.
	nodeCreds []credentialLookup
	mirrors   map[string][]string
	imagesDir string
	tmpDir    string
	lock      *os.File

	// ctx is the parent of every pull; cancelled by Close.
	ctx    context.Context
	cancel context.CancelFunc
	// flights dedups concurrent pulls of one digest.
	flights singleflight.Group
	// wg counts pull and removal goroutines.
	wg sync.WaitGroup

	// mu protects the fields below.
	mu sync.Mutex
	// entries maps a manifest digest to its image.
	// Invariant: bytes is the sum of entries' sizes.
	entries map[string]*entry
	bytes   int64
	// refs maps a reference key to the digest it last resolved to.
	// Invariant: every value is a key of entries.
	refs     map[string]string
	closed   bool
	inFlight int
	stats    Stats
	// access records who may use each cached registry image, by manifest
	// digest (see access.go).
	access map[string]*access
	// accessKey keys credential fingerprints. Immutable.
	accessKey [32]byte
}

// NewCache opens (or creates) the cache in cfg.Dir, rebuilding its index
// from the directory: images that finished flattening before a restart are
// kept, anything half-made is removed.
//
// After a restart, images used by volumes that survived it must be pinned
// again with Open before anything can trigger collection (a Get, Release
// or GC).
func NewCache(cfg Config) (*Cache, error) {
	if cfg.Dir == "" {
		return nil, fmt.Errorf("%w: image cache directory not set", ErrInvalidArgument)
	}
	if cfg.ProgressInterval <= 0 {
		cfg.ProgressInterval = 5 * time.Second
	}
	if cfg.StallTimeout <= 0 {
		cfg.StallTimeout = 2 * time.Minute
	}
	if cfg.PullTimeout <= 0 {
		cfg.PullTimeout = time.Hour
	}
	if cfg.MaxFiles == 0 {
		cfg.MaxFiles = DefaultMaxFiles
	}
	if cfg.MaxPathLength == 0 {
		cfg.MaxPathLength = DefaultMaxPathLength
	}
	c := &Cache{
		cfg:       cfg,
		retry:     remote.Backoff{Duration: 500 * time.Millisecond, Factor: 2, Jitter: 0.1, Steps: 3},
		imagesDir: filepath.Join(cfg.Dir, "images"),
		tmpDir:    filepath.Join(cfg.Dir, "tmp"),
		entries:   make(map[string]*entry),
		refs:      make(map[string]string),
		access:    make(map[string]*access),
		accessKey: newAccessKey(),
	}
	c.stats.Pulls = make(map[PullResult]uint64)
	c.platform = v1.Platform{OS: "linux", Architecture: runtime.GOARCH}
	if runtime.GOARCH == "arm" {
		c.platform.Variant = "v7"
	}
	if cfg.Platform != "" {
		p, err := v1.ParsePlatform(cfg.Platform)
		if err != nil {
			return nil, fmt.Errorf("%w: platform %q: %v", ErrInvalidArgument, cfg.Platform, err)
		}
		c.platform = *p
	}
	var err error
	if c.policy, err = newRegistryPolicy(cfg.AllowedRegistries, cfg.InsecureRegistries); err != nil {
		return nil, err
	}
	if c.transport, err = newTransport(&c.cfg, c.policy); err != nil {
		return nil, err
	}
	if len(cfg.NodeDockerConfigs) > 0 {
		n, err := newNodeConfigKeychain(cfg.NodeDockerConfigs, cfg.Logger)
		if err != nil {
			return nil, err
		}
		c.nodeCreds = append(c.nodeCreds, nodeLookup{n})
	}
	if c.mirrors, err = newMirrors(cfg.Mirrors, c.policy); err != nil {
		return nil, err
	}
	if cfg.CredentialProviderConfig != "" {
		pk, err := newProviderKeychains(cfg.CredentialProviderConfig, cfg.CredentialProviderBinDir, cfg.Logger)
		if err != nil {
			return nil, err
		}
		c.nodeCreds = append(c.nodeCreds, pk)
	} else if cfg.CredentialProviderBinDir != "" {
		return nil, fmt.Errorf("%w: a credential provider bin dir without a credential provider config", ErrInvalidArgument)
	}

	for _, d := range []string{cfg.Dir, c.imagesDir, c.tmpDir} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			return nil, err
		}
	}
	// Image trees hold set-id files: keep host users out.
	for _, d := range []string{c.imagesDir, c.tmpDir} {
		if err := os.Chmod(d, 0o700); err != nil {
			return nil, err
		}
	}
	lock, err := os.OpenFile(filepath.Join(cfg.Dir, "lock"), os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		return nil, err
	}
	if err := unix.Flock(int(lock.Fd()), unix.LOCK_EX|unix.LOCK_NB); err != nil {
		lock.Close()
		return nil, fmt.Errorf("image cache %s is in use by another process: %w", cfg.Dir, err)
	}
	c.lock = lock
	if err := c.load(); err != nil {
		lock.Close()
		return nil, err
	}
	c.ctx, c.cancel = context.WithCancel(context.Background())
	return c, nil
}

// load rebuilds the index from the directory.
func (c *Cache) load() error {
	// Leftovers of pulls and collections interrupted by a crash.
	tmps, err := os.ReadDir(c.tmpDir)
	if err != nil {
		return err
	}
	for _, t := range tmps {
		if err := os.RemoveAll(filepath.Join(c.tmpDir, t.Name())); err != nil {
			return err
		}
	}
	dirs, err := os.ReadDir(c.imagesDir)
	if err != nil {
		return err
	}
	for _, d := range dirs {
		dir := filepath.Join(c.imagesDir, d.Name())
		e, err := readEntry(dir, d.Name())
		if err != nil {
			// Not ours or damaged: never serve it.
			if err := os.Rename(dir, filepath.Join(c.tmpDir, "bad-"+d.Name())); err == nil {
				os.RemoveAll(filepath.Join(c.tmpDir, "bad-"+d.Name()))
			}
			continue
		}
		c.entries[e.digest] = e
		c.bytes += e.size
		if e.public {
			c.access[e.digest] = &access{public: true, grants: map[string]bool{}}
		}
	}
	b, err := os.ReadFile(filepath.Join(c.cfg.Dir, "refs.json"))
	if err != nil && !errors.Is(err, fs.ErrNotExist) {
		return err
	}
	if err == nil {
		var refs map[string]string
		if json.Unmarshal(b, &refs) == nil {
			for k, d := range refs {
				if c.entries[d] != nil {
					c.refs[k] = d
				}
			}
		}
	}
	return nil
}

// dirName is the directory name of a digest: "sha256:hex" -> "sha256-hex".
func dirName(digest string) string { return strings.Replace(digest, ":", "-", 1) }

// readEntry reads the entry in dir, named name.
func readEntry(dir, name string) (*entry, error) {
	b, err := os.ReadFile(filepath.Join(dir, "meta.json"))
	if err != nil {
		return nil, err
	}
	var m meta
	if err := json.Unmarshal(b, &m); err != nil {
		return nil, err
	}
	if h, err := v1.NewHash(m.Digest); err != nil || dirName(h.String()) != name {
		return nil, fmt.Errorf("meta.json digest %q does not match %q", m.Digest, name)
	}
	fi, err := os.Lstat(filepath.Join(dir, "rootfs"))
	if err != nil {
		return nil, err
	}
	if !fi.IsDir() {
		return nil, fmt.Errorf("%s/rootfs is not a directory", dir)
	}
	mfi, err := os.Stat(filepath.Join(dir, "meta.json"))
	if err != nil {
		return nil, err
	}
	return &entry{digest: m.Digest, dir: dir, size: m.Size, inodes: m.Inodes, lastUsed: mfi.ModTime(), public: m.Public}, nil
}

// Close stops running pulls, waits for them and releases the directory.
// Images already handed out keep their trees on disk.
func (c *Cache) Close() error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	c.cancel()
	c.wg.Wait()
	return c.lock.Close()
}

// Get returns the image ref names, flattened and pinned, pulling it
// according to policy with the credentials of kc (nil: anonymous).
//
// Concurrent Gets of one image share one pull. A pull outlives a Get whose
// ctx ends (the Get returns ctx's error): a later Get of the same image
// joins it or finds its result. Errors wrap the sentinels of this package.
func (c *Cache) Get(ctx context.Context, ref string, policy PullPolicy, kc authn.Keychain) (*Image, error) {
	if policy < PullIfNotPresent || policy > PullNever {
		return nil, fmt.Errorf("%w: pull policy %d", ErrInvalidArgument, int(policy))
	}
	s, err := c.parseRef(ref)
	if err != nil {
		return nil, err
	}
	c.mu.Lock()
	closed := c.closed
	c.mu.Unlock()
	if closed {
		return nil, ErrClosed
	}
	if s.remote != nil {
		kc = c.keychain(s, kc)
	}
	fp := c.fingerprint(s, kc)
	if policy != PullAlways {
		img, err := c.pin(s.key, s.digest)
		if err != nil {
			return nil, err
		}
		switch {
		case img != nil && c.mayUse(s, img.Digest, fp):
			return img, nil
		case img != nil:
			// Cached from a pull with other credentials: this caller must
			// show the source it may have the image (see access.go).
			img.Release()
			if policy == PullNever {
				return nil, fmt.Errorf("%w: %s is cached from a pull with other credentials, and the pull policy Never does not let the registry check this volume's", ErrUnauthorized, s.key)
			}
		case policy == PullNever:
			return nil, fmt.Errorf("%w: %s is not cached and the pull policy is Never", ErrNotFound, s.key)
		}
	}
	for attempt := 0; attempt < 3; attempt++ {
		start := time.Now()
		r, err := c.resolve(ctx, s, kc)
		if err != nil {
			if ctx.Err() == nil {
				c.record(PullEvent{Ref: s.key, Result: ResultOf(err), Duration: time.Since(start), Err: err})
			}
			return nil, err
		}
		digest := r.digest.String()
		// The source gave this caller the manifest: it may use the image.
		c.grant(s, digest, fp)
		if img, err := c.pinDigest(s.key, digest, true); img != nil || err != nil {
			return img, err
		}
		if err := c.checkBudget(s.key, r); err != nil {
			c.record(PullEvent{Ref: s.key, Digest: digest, Result: ResultOf(err), Duration: time.Since(start), Err: err})
			return nil, err
		}
		ch := c.flights.DoChan(digest, func() (any, error) {
			return nil, c.pull(s, r, kc)
		})
		select {
		case res := <-ch:
			if res.Err != nil {
				return nil, res.Err
			}
		case <-ctx.Done():
			return nil, ctx.Err()
		}
		if img, err := c.pinDigest(s.key, digest, false); img != nil || err != nil {
			return img, err
		}
		// Collected between landing and pinning: try again.
	}
	return nil, fmt.Errorf("%w: %s was collected before it could be used", ErrCacheFull, s.key)
}

// Open pins the cached image with the manifest digest, without contacting
// any source: the way to re-pin the images of volumes that survived a
// restart. A digest not cached is ErrNotFound.
func (c *Cache) Open(digest string) (*Image, error) {
	h, err := v1.NewHash(digest)
	if err != nil {
		return nil, fmt.Errorf("%w: digest %q", ErrInvalidArgument, digest)
	}
	img, err := c.pinDigest("", h.String(), false)
	if err == nil && img == nil {
		err = fmt.Errorf("%w: %s is not cached", ErrNotFound, digest)
	}
	return img, err
}

// pin pins the image the reference key last resolved to, or (for a
// reference by digest) the image with that manifest digest. It returns
// nil, nil if there is none.
func (c *Cache) pin(key, digest string) (*Image, error) {
	c.mu.Lock()
	d, ok := c.refs[key]
	c.mu.Unlock()
	if !ok {
		if digest == "" {
			return nil, nil
		}
		d = digest
	}
	return c.pinDigest(key, d, true)
}

// pinDigest pins the image with the manifest digest and records that key
// (if not empty) resolves to it; hit counts it as a cache hit. It returns
// nil, nil if it is not cached.
func (c *Cache) pinDigest(key, digest string, hit bool) (*Image, error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	e := c.entries[digest]
	if e == nil {
		c.mu.Unlock()
		return nil, nil
	}
	e.pins++
	e.lastUsed = time.Now()
	if hit {
		c.stats.Hits++
	}
	if key != "" && c.refs[key] != digest {
		c.refs[key] = digest
		c.saveRefsLocked()
	}
	c.mu.Unlock()
	// Persist the use time for LRU across restarts (best effort).
	now := time.Now()
	os.Chtimes(filepath.Join(e.dir, "meta.json"), now, now)
	return &Image{Ref: key, Digest: digest, Root: filepath.Join(e.dir, "rootfs"), Size: e.size, c: c, e: e}, nil
}

// release unpins e and collects if the cache is over budget.
func (c *Cache) release(e *entry) {
	c.mu.Lock()
	e.pins--
	if e.pins < 0 {
		panic("image: entry released more often than pinned")
	}
	e.lastUsed = time.Now()
	c.gcLocked("")
	c.mu.Unlock()
}

// checkBudget refuses an image whose compressed layers alone exceed the
// budget.
func (c *Cache) checkBudget(key string, r *resolved) error {
	if c.cfg.Budget <= 0 {
		return nil
	}
	m, err := r.img.Manifest()
	if err != nil {
		return classifyRemote(key, err)
	}
	var total int64
	for _, l := range m.Layers {
		total += l.Size
	}
	if total > c.cfg.Budget {
		return fmt.Errorf("%w: %s has %d bytes of layers, over the cache budget of %d", ErrCacheFull, key, total, c.cfg.Budget)
	}
	return nil
}

// GC collects unused images, least recently used first, until the cache is
// within its budget. It returns the number of images and bytes collected.
func (c *Cache) GC() (images int, bytes int64) {
	c.mu.Lock()
	defer c.mu.Unlock()
	before, n := c.bytes, c.stats.Evictions
	c.gcLocked("")
	return int(c.stats.Evictions - n), before - c.bytes
}

// gcLocked collects unpinned images other than keep, least recently used
// first, while the cache is over budget. Trees are renamed out of images/
// at once and deleted in the background.
//
// Preconditions: c.mu is locked.
func (c *Cache) gcLocked(keep string) {
	if c.closed || c.cfg.Budget <= 0 || c.bytes <= c.cfg.Budget {
		return
	}
	var victims []*entry
	for _, e := range c.entries {
		if e.pins == 0 && e.digest != keep {
			victims = append(victims, e)
		}
	}
	sort.Slice(victims, func(i, j int) bool { return victims[i].lastUsed.Before(victims[j].lastUsed) })
	var trash []string
	for _, e := range victims {
		if c.bytes <= c.cfg.Budget {
			break
		}
		t, err := os.MkdirTemp(c.tmpDir, "gc-")
		if err != nil {
			break
		}
		if err := os.Rename(e.dir, filepath.Join(t, "image")); err != nil {
			os.Remove(t)
			continue
		}
		trash = append(trash, t)
		delete(c.entries, e.digest)
		e.gone = true
		c.bytes -= e.size
		c.stats.Evictions++
		for k, d := range c.refs {
			if d == e.digest {
				delete(c.refs, k)
			}
		}
	}
	if len(trash) == 0 {
		return
	}
	c.saveRefsLocked()
	c.wg.Add(1)
	go func() {
		defer c.wg.Done()
		for _, t := range trash {
			os.RemoveAll(t)
		}
	}()
}

// saveRefsLocked writes refs.json (best effort: a lost update only costs a
// registry round trip after a restart).
//
// Preconditions: c.mu is locked.
func (c *Cache) saveRefsLocked() {
	b, err := json.Marshal(c.refs)
	if err != nil {
		return
	}
	p := filepath.Join(c.cfg.Dir, "refs.json")
	tmp := p + ".tmp"
	if err := os.WriteFile(tmp, b, 0o600); err != nil {
		return
	}
	os.Rename(tmp, p)
}

// Stats returns a snapshot of the cache's state and counters.
func (c *Cache) Stats() Stats {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.stats
	s.Pulls = make(map[PullResult]uint64, len(c.stats.Pulls))
	for k, v := range c.stats.Pulls {
		s.Pulls[k] = v
	}
	s.Images, s.Bytes, s.Budget, s.InFlight = len(c.entries), c.bytes, c.cfg.Budget, c.inFlight
	for _, e := range c.entries {
		if e.pins > 0 {
			s.Pinned++
		}
	}
	return s
}

// record counts a pull attempt and reports it to Config.OnPull.
func (c *Cache) record(ev PullEvent) {
	c.mu.Lock()
	c.stats.Pulls[ev.Result]++
	c.stats.PullBytes += ev.Bytes
	c.stats.PullSeconds += ev.Duration.Seconds()
	c.mu.Unlock()
	if c.cfg.OnPull != nil {
		c.cfg.OnPull(ev)
	}
}

// checkInvariants panics if the index is inconsistent. For tests.
func (c *Cache) checkInvariants() {
	c.mu.Lock()
	defer c.mu.Unlock()
	var sum int64
	for d, e := range c.entries {
		if e.digest != d || e.gone || e.pins < 0 {
			panic(fmt.Sprintf("image: bad entry %s: %+v", d, e))
		}
		sum += e.size
	}
	if sum != c.bytes {
		panic(fmt.Sprintf("image: bytes %d, entries add up to %d", c.bytes, sum))
	}
	for k, d := range c.refs {
		if c.entries[d] == nil {
			panic(fmt.Sprintf("image: ref %s points to missing %s", k, d))
		}
	}
}

// Subdir returns the path of the directory p (an imagePath volume
// attribute: "/", "usr/share/data", "/etc/") inside the image, checked so
// that it is a real directory of the image reached without any symlink:
// joining Root and p is safe to hand to the overlay because the tree never
// changes. A p with a ".." component is ErrInvalidArgument; a missing
// directory, or one reached through a symlink, ErrNotFound.
func (img *Image) Subdir(p string) (string, error) {
	clean, err := cleanPath(strings.TrimPrefix(p, "/"))
	if err != nil || len(p) > 4096 {
		return "", fmt.Errorf("%w: imagePath %q: want a path inside the image without \"..\"", ErrInvalidArgument, p)
	}
	if clean == "" {
		return img.Root, nil
	}
	root, err := unix.Open(img.Root, unix.O_PATH|unix.O_DIRECTORY|unix.O_CLOEXEC|unix.O_NOFOLLOW, 0)
	if err != nil {
		return "", err
	}
	defer unix.Close(root)
	fd, err := unix.Openat2(root, clean, &unix.OpenHow{
		Flags:   unix.O_PATH | unix.O_DIRECTORY | unix.O_CLOEXEC | unix.O_NOFOLLOW,
		Resolve: resolveStrict,
	})
	if err != nil {
		return "", fmt.Errorf("%w: imagePath %q is not a directory of image %s (%v)", ErrNotFound, p, img.Digest, err)
	}
	unix.Close(fd)
	return filepath.Join(img.Root, filepath.FromSlash(clean)), nil
}
