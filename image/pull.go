package image

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash"
	"io"
	"net/url"
	"os"
	"path/filepath"
	"sync/atomic"
	"time"

	"github.com/google/go-containerregistry/pkg/authn"
	"github.com/google/go-containerregistry/pkg/name"
	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/remote"
	"github.com/google/go-containerregistry/pkg/v1/remote/transport"
	"github.com/klauspost/compress/gzip"
	"github.com/klauspost/compress/zstd"
	"golang.org/x/sys/unix"
)

// errStalled is the cancellation cause of a pull that received nothing for
// Config.StallTimeout.
var errStalled = fmt.Errorf("%w: pull stalled", ErrUnavailable)

// errPullTimeout is the cause of a pull that ran past Config.PullTimeout.
var errPullTimeout = fmt.Errorf("%w: pull timed out", ErrUnavailable)

// pull fetches, verifies and flattens the resolved image r into the cache.
// It runs once per digest at a time (Cache.flights) on the cache's own
// context, whatever happens to the Get that started it.
func (c *Cache) pull(s *source, r *resolved, kc authn.Keychain) (err error) {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return ErrClosed
	}
	c.wg.Add(1)
	c.inFlight++
	c.mu.Unlock()

	digest := r.digest.String()
	start := time.Now()
	var fetched atomic.Int64
	defer func() {
		c.mu.Lock()
		c.inFlight--
		c.mu.Unlock()
		c.record(PullEvent{Ref: s.key, Digest: digest, Result: ResultOf(err), Duration: time.Since(start), Bytes: fetched.Load(), Err: err})
		c.wg.Done()
	}()

	ctx, cancel := context.WithCancelCause(c.ctx)
	defer cancel(nil)
	ctx, cancelTimeout := context.WithTimeoutCause(ctx, c.cfg.PullTimeout, errPullTimeout)
	defer cancelTimeout()

	img := r.img
	if s.remote != nil {
		// r.img is bound to the context of the Get that resolved it; fetch
		// through the pull's own context instead.
		// The manifest comes from where the Get found it, or else from
		// the mirrors and the registry in order.
		refs := []name.Reference{r.from}
		for _, m := range append(s.mirrors, s.remote) {
			if m != r.from {
				refs = append(refs, m)
			}
		}
		for i, ref := range refs {
			img, err = remote.Image(ref.Context().Digest(digest), c.remoteOptions(ctx, kc)...)
			if err == nil || ctx.Err() != nil || i == len(refs)-1 {
				break
			}
			c.mirrorFailed(s, ref, classifyRemote(s.key, err))
		}
		if err != nil {
			return c.pullError(ctx, s.key, err)
		}
	}
	m, err := img.Manifest()
	if err != nil {
		return c.pullError(ctx, s.key, err)
	}
	if err := verifyConfig(img, m); err != nil {
		return c.pullError(ctx, s.key, err)
	}
	layers, err := img.Layers()
	if err != nil {
		return c.pullError(ctx, s.key, err)
	}
	// Digests come from the manifest and config only: asking a layer for
	// its DiffID may hash its (unverified) content.
	cf, err := img.ConfigFile()
	if err != nil {
		if !errors.As(err, new(*json.SyntaxError)) && !errors.As(err, new(*json.UnmarshalTypeError)) {
			return c.pullError(ctx, s.key, err)
		}
		return c.pullError(ctx, s.key, fmt.Errorf("%w: config: malformed JSON", ErrCorrupt))
	}
	if len(cf.RootFS.DiffIDs) != len(m.Layers) || len(layers) != len(m.Layers) {
		return fmt.Errorf("%w: %s: %d layers but %d diff IDs", ErrCorrupt, s.key, len(m.Layers), len(cf.RootFS.DiffIDs))
	}
	var total int64
	for _, l := range m.Layers {
		total += l.Size
	}

	// Progress and stall watch.
	var layerNo atomic.Int64
	watchDone := make(chan struct{})
	defer close(watchDone)
	go func() {
		tick := time.NewTicker(min(time.Second, c.cfg.ProgressInterval, c.cfg.StallTimeout/2))
		defer tick.Stop()
		last, lastChange, lastReport := int64(-1), time.Now(), time.Now()
		for {
			select {
			case <-watchDone:
				return
			case now := <-tick.C:
				if n := fetched.Load(); n != last {
					last, lastChange = n, now
				} else if now.Sub(lastChange) >= c.cfg.StallTimeout {
					cancel(errStalled)
				}
				if c.cfg.Progress != nil && now.Sub(lastReport) >= c.cfg.ProgressInterval {
					lastReport = now
					c.cfg.Progress(Progress{Ref: s.key, Digest: digest, Layer: int(layerNo.Load()), Layers: len(layers),
						Bytes: fetched.Load(), TotalBytes: total, Elapsed: now.Sub(start)})
				}
			}
		}
	}()

	tmp, err := os.MkdirTemp(c.tmpDir, "pull-"+r.digest.Hex[:12]+"-")
	if err != nil {
		return classifyLocal(err)
	}
	defer func() {
		if err != nil {
			os.RemoveAll(tmp)
		}
	}()
	rootfs := filepath.Join(tmp, "rootfs")
	if err := os.Mkdir(rootfs, 0o755); err != nil {
		return classifyLocal(err)
	}
	lim, err := c.flattenLimits()
	if err != nil {
		return fmt.Errorf("%s: %w", s.key, err)
	}
	fl, err := newFlattener(rootfs, lim)
	if err != nil {
		return classifyLocal(err)
	}
	defer fl.Close()
	for i, l := range layers {
		layerNo.Store(int64(i))
		if err := c.applyLayer(ctx, fl, l, m.Layers[i].Digest, cf.RootFS.DiffIDs[i], r.layersCompressed, &fetched); err != nil {
			return c.pullError(ctx, s.key, fmt.Errorf("layer %d: %w", i, err))
		}
	}
	if err := fl.Finish(); err != nil {
		return classifyLocal(err)
	}
	size, inodes, err := treeSize(rootfs)
	if err != nil {
		return classifyLocal(err)
	}
	b, _ := json.Marshal(meta{Digest: digest, Size: size, Inodes: inodes, Ref: s.key, Created: time.Now().UTC(),
		Public: s.remote != nil && c.fingerprint(s, kc) == ""})
	if err := os.WriteFile(filepath.Join(tmp, "meta.json"), b, 0o600); err != nil {
		return classifyLocal(err)
	}
	if !c.cfg.NoSync {
		if err := syncfs(tmp); err != nil {
			return classifyLocal(err)
		}
	}
	if err := ctx.Err(); err != nil {
		return c.pullError(ctx, s.key, err)
	}

	// Land: rename into images/ (atomic: a tree is either complete there
	// or absent) and index it.
	dir := filepath.Join(c.imagesDir, dirName(digest))
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.closed {
		return ErrClosed
	}
	if err := os.Rename(tmp, dir); err != nil {
		return classifyLocal(err)
	}
	if !c.cfg.NoSync {
		fsyncDir(c.imagesDir)
	}
	e := &entry{digest: digest, dir: dir, size: size, inodes: inodes, lastUsed: time.Now()}
	c.entries[digest] = e
	c.bytes += size
	c.refs[s.key] = digest
	c.saveRefsLocked()
	c.gcLocked(digest)
	return nil
}

// flattenLimits returns the limits of one image's flattening: contents
// within the budget and the disk's available bytes less the reserve,
// entries within MaxFiles, paths within MaxPathLength.
func (c *Cache) flattenLimits() (limits, error) {
	lim := limits{bytes: c.cfg.Budget, bytesWhy: "the image cache budget"}
	if c.cfg.MaxFiles > 0 {
		lim.files = c.cfg.MaxFiles
	}
	if c.cfg.MaxPathLength > 0 {
		lim.pathLen = c.cfg.MaxPathLength
	}
	if c.cfg.DiskReserve < 0 {
		return lim, nil
	}
	var st unix.Statfs_t
	if err := unix.Statfs(c.tmpDir, &st); err != nil {
		return lim, &os.PathError{Op: "statfs", Path: c.tmpDir, Err: err}
	}
	reserve := c.cfg.DiskReserve
	if reserve == 0 {
		reserve = min(1<<30, int64(st.Blocks)*st.Bsize/20)
	}
	avail := int64(st.Bavail) * st.Bsize
	if avail-reserve <= 0 {
		return lim, fmt.Errorf("%w: the disk under the image cache has %d bytes available, not more than its reserve of %d", ErrTooLarge, avail, reserve)
	}
	if lim.bytes <= 0 || avail-reserve < lim.bytes {
		lim.bytes, lim.bytesWhy = avail-reserve, fmt.Sprintf("the available space on the image cache's disk less its reserve of %d bytes", reserve)
	}
	// Other pulls and other users of the disk write too: look again
	// while writing.
	lim.diskFree = func() error {
		var st unix.Statfs_t
		if err := unix.Statfs(c.tmpDir, &st); err != nil {
			return nil
		}
		if avail := int64(st.Bavail) * st.Bsize; avail < reserve {
			return fmt.Errorf("%w: the disk under the image cache has %d bytes available, less than its reserve of %d", ErrTooLarge, avail, reserve)
		}
		return nil
	}
	return lim, nil
}

// pullError classifies err from a pull of key running on ctx.
func (c *Cache) pullError(ctx context.Context, key string, err error) error {
	if ctx.Err() != nil {
		if c.ctx.Err() != nil {
			return fmt.Errorf("%w: %s: pull stopped", ErrClosed, key)
		}
		if cause := context.Cause(ctx); cause != nil && errors.Is(cause, ErrUnavailable) {
			return fmt.Errorf("%s: %w", key, cause)
		}
	}
	var ue *url.Error
	var te *transport.Error
	if errors.As(err, &ue) || errors.As(err, &te) {
		// From the network: its text may quote the server.
		return classifyRemote(key, err)
	}
	err = classifyLocal(err)
	if hasSentinel(err) {
		return fmt.Errorf("%s: %w", key, err)
	}
	return classifyRemote(key, err)
}

// verifyConfig checks the config blob against the digest in the manifest
// (go-containerregistry does for registries, not for layouts).
func verifyConfig(img v1.Image, m *v1.Manifest) error {
	raw, err := img.RawConfigFile()
	if err != nil {
		return err
	}
	if m.Config.Digest.Algorithm != "sha256" {
		return fmt.Errorf("%w: config digest algorithm %q", ErrCorrupt, m.Config.Digest.Algorithm)
	}
	sum := sha256.Sum256(raw)
	if hex.EncodeToString(sum[:]) != m.Config.Digest.Hex {
		return fmt.Errorf("%w: config does not match its digest %s", ErrCorrupt, m.Config.Digest)
	}
	return nil
}

// sourceError marks an error returned by the stream of a blob (the
// network, the disk), as opposed to an error decoding what it returned.
type sourceError struct{ err error }

func (e *sourceError) Error() string { return e.err.Error() }
func (e *sourceError) Unwrap() error { return e.err }

// sourceReader reads a blob, hashing and counting what it reads, honouring
// ctx, and remembering the first error of the stream itself.
type sourceReader struct {
	ctx     context.Context
	r       io.Reader
	h       hash.Hash
	n       int64
	fetched *atomic.Int64
	err     error
}

func (s *sourceReader) Read(p []byte) (int, error) {
	if s.err != nil {
		return 0, s.err
	}
	if err := s.ctx.Err(); err != nil {
		s.err = &sourceError{context.Cause(s.ctx)}
		return 0, s.err
	}
	n, err := s.r.Read(p)
	s.h.Write(p[:n])
	s.n += int64(n)
	s.fetched.Add(int64(n))
	if err != nil && err != io.EOF {
		if cause := context.Cause(s.ctx); s.ctx.Err() != nil && cause != nil {
			err = cause
		}
		s.err = &sourceError{err}
		return n, s.err
	}
	return n, err
}

// hashReader hashes what passes through it and remembers a read error.
type hashReader struct {
	r   io.Reader
	h   hash.Hash
	err error
}

func (h *hashReader) Read(p []byte) (int, error) {
	n, err := h.r.Read(p)
	h.h.Write(p[:n])
	if err != nil && err != io.EOF && h.err == nil {
		h.err = err
	}
	return n, err
}

var (
	gzipMagic = []byte{0x1f, 0x8b}
	zstdMagic = []byte{0x28, 0xb5, 0x2f, 0xfd}
)

// applyLayer reads one layer, verifies its digests and applies it to fl.
// With compressed, the compressed blob is read and checked against the
// layer digest want (from the manifest), decompressed here (gzip, zstd or none) and the result
// checked against the diff ID from the config; otherwise the uncompressed
// stream is read and checked against the diff ID. Everything is read to
// the end, so a blob is verified even when the tar ends early.
func (c *Cache) applyLayer(ctx context.Context, fl *flattener, l v1.Layer, want, diffID v1.Hash, compressed bool, fetched *atomic.Int64) error {
	var rc io.ReadCloser
	var err error
	if compressed {
		rc, err = l.Compressed()
	} else {
		rc, err = l.Uncompressed()
	}
	if err != nil {
		return err
	}
	defer rc.Close()
	src := &sourceReader{ctx: ctx, r: rc, h: sha256.New(), fetched: fetched}
	br := bufio.NewReaderSize(src, 1<<16)
	var tarStream io.Reader = br
	var closeDec func()
	if compressed {
		magic, _ := br.Peek(4)
		switch {
		case bytes.HasPrefix(magic, gzipMagic):
			zr, err := gzip.NewReader(br)
			if err != nil {
				return c.layerError(src, nil, err)
			}
			zr.Multistream(true)
			tarStream = zr
		case bytes.HasPrefix(magic, zstdMagic):
			zr, err := zstd.NewReader(br, zstd.WithDecoderConcurrency(1))
			if err != nil {
				return c.layerError(src, nil, err)
			}
			closeDec = zr.Close
			tarStream = zr
		}
	}
	if closeDec != nil {
		defer closeDec()
	}
	un := &hashReader{r: tarStream, h: sha256.New()}
	if err := fl.ApplyLayer(un); err != nil {
		return c.layerError(src, un, err)
	}
	// Read what follows the tar's end (padding) to the end of both streams.
	if _, err := io.Copy(io.Discard, un); err != nil {
		return c.layerError(src, un, err)
	}
	if _, err := io.Copy(io.Discard, br); err != nil {
		return c.layerError(src, un, err)
	}
	if compressed && (want.Algorithm != "sha256" || hex.EncodeToString(src.h.Sum(nil)) != want.Hex) {
		return fmt.Errorf("%w: blob does not match its digest %s", ErrCorrupt, want)
	}
	if diffID.Algorithm != "sha256" || hex.EncodeToString(un.h.Sum(nil)) != diffID.Hex {
		return fmt.Errorf("%w: layer content does not match its diff ID %s", ErrCorrupt, diffID)
	}
	return nil
}

// layerError classifies err from reading or applying a layer: a failure of
// the blob stream itself is the network's (ErrUnavailable) unless it is
// go-containerregistry's digest check (ErrCorrupt); a failure to decode is
// ErrCorrupt; anything else (unsafe content, the local disk) stays as is.
func (c *Cache) layerError(src *sourceReader, un *hashReader, err error) error {
	if src.err != nil {
		inner := errors.Unwrap(src.err)
		if errors.Is(inner, ErrUnavailable) || errors.Is(inner, context.Canceled) || errors.Is(inner, context.DeadlineExceeded) {
			return inner
		}
		if isNetworkError(inner) {
			return fmt.Errorf("%w: %w", ErrUnavailable, &remoteError{describeNet(inner)})
		}
		// go-containerregistry's digest or size check of the stream
		// (no server text in the message).
		return fmt.Errorf("%w: %w", ErrCorrupt, &remoteError{"the blob does not match its digest or size"})
	}
	if errors.Is(err, ErrUnsafe) || errors.Is(err, ErrCorrupt) || errors.Is(err, ErrCacheFull) {
		return err
	}
	if un == nil || un.err != nil {
		return fmt.Errorf("%w: %w", ErrCorrupt, err)
	}
	return classifyLocal(err)
}

// syncfs flushes the filesystem holding dir.
func syncfs(dir string) error {
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return unix.Syncfs(fd)
}

// fsyncDir makes a rename in dir durable (best effort).
func fsyncDir(dir string) {
	if f, err := os.Open(dir); err == nil {
		f.Sync()
		f.Close()
	}
}
