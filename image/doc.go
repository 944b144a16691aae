// Package image turns OCI images into read-only directory trees on the
// node's disk, the lower layers of csi-memfs volumes: it pulls them (from
// registries, OCI image layouts or image tarballs) with
// go-containerregistry, verifies every blob, flattens the layers once per
// image into a node-wide cache keyed by manifest digest, hands out pinned
// handles and collects unused images under a size budget.
//
// It must run as root (CAP_CHOWN, CAP_DAC_OVERRIDE, CAP_FOWNER) to keep
// ownership and unpack read-only directories; it needs Linux >= 5.6
// (openat2). It knows nothing of CSI, gRPC, FUSE or Prometheus and logs only
// to Config.Logger what no error can carry (credential provider plugins
// and mirrors that failed): it returns typed errors, calls the Progress
// and OnPull hooks of its Config, and exposes Stats.
//
// # Use
//
//	c, err := image.NewCache(image.Config{
//		Dir:                filepath.Join(stateDir, "images"),
//		Budget:             10 << 30,
//		InsecureRegistries: flagInsecureRegistries, // "host[:port]", plain HTTP, any address
//		AllowedRegistries:  flagAllowedRegistries,  // if set, the only registries
//		CAFile:             flagRegistryCAFile,     // PEM, added to the system's roots
//		LocalPrefix:        "oci:",
//		LocalDir:           "/var/lib/csi-memfs/images",
//		Progress:           func(p image.Progress) { logger.Info("Pulling image", "ref", p.Ref, "bytes", p.Bytes, "total", p.TotalBytes) },
//		OnPull:             func(e image.PullEvent) { pulls.WithLabelValues(string(e.Result)).Inc(); ... },
//	})
//	defer c.Close()
//
//	// At startup, before anything else: re-pin the images of volumes
//	// that survived the restart (from the driver's journal).
//	img, err := c.Open(journal.ImageDigest)
//
//	// NodePublishVolume:
//	policy, err := image.ParsePullPolicy(attrs["imagePullPolicy"]) // ErrInvalidArgument
//	kc, err := image.KeychainFromSecrets(req.GetSecrets())         // ErrInvalidArgument
//	img, err := c.Get(ctx, attrs["image"], policy, kc)
//	root, err := img.Subdir(attrs["imagePath"])                    // symlink-free
//	lower, err := overlay.NewDirLower(root)
//	// ... record img.Digest in the journal ...
//
//	// NodeUnpublishVolume (or a failed publish):
//	img.Release()
//
// An Image stays on disk, unchanged, until it is released: collection
// never touches a pinned image. Release is idempotent. The tree under
// Image.Root must be treated as read-only; it is shared by every volume of
// the image.
//
// # Pull policies
//
//   - PullIfNotPresent (default): a reference seen before is answered from
//     the cache with no network; a reference by digest is answered if that
//     manifest (or the image an index digest resolved to) is cached. But a
//     cached image is handed out offline only to a caller the source is
//     known to serve it to: anyone, for an image fetched without
//     credentials (remembered across restarts), or a caller with the very
//     credentials the source accepted for it (remembered by this process).
//     Any other caller is checked at the source first, with one manifest
//     request, so a pod cannot use another team's private image just
//     because it is cached (access.go).
//   - PullAlways: the reference is resolved at the source with the
//     caller's credentials every time; layers are fetched only if the
//     resulting digest is not cached.
//   - PullNever: cache only; otherwise ErrNotFound, and ErrUnauthorized for
//     a cached image the caller is not known to be allowed (Never may not
//     ask the source).
//
// # References
//
// Registry references are parsed by go-containerregistry's name package
// (Docker defaults: "busybox" is index.docker.io/library/busybox:latest).
// A multi-platform index is resolved to Config.Platform (default
// linux/GOARCH), nested indexes included; the cache key is the platform
// manifest's digest.
//
// A reference starting with Config.LocalPrefix names a local image:
// PREFIX NAME, PREFIX NAME:TAG (the org.opencontainers.image.ref.name
// annotation in the layout's index) or PREFIX NAME@DIGEST. NAME is
// slash-separated elements of [A-Za-z0-9][A-Za-z0-9._-]* and is looked up
// under Config.LocalDir as an OCI image layout directory, or as an image
// tarball (docker save / go-containerregistry tarball format, NAME or
// NAME.tar). A pod can thus only pick among the images the operator put
// there, never name a path.
//
// # Transport security
//
// A pod names the image, so it names the host the plugin, on the node's
// network, sends requests to (transport.go). Registries are spoken to
// over HTTPS with the system's roots (SSL_CERT_FILE, SSL_CERT_DIR; the
// fallback roots the program registers when the system has none) plus
// Config.CAFile. Plain HTTP goes only to Config.InsecureRegistries, loopback
// ones included; every other plain-HTTP request — go-containerregistry's
// fallback for RFC 1918 and loopback hosts, a redirect — is refused before
// it is sent. A registry not listed in Config.InsecureRegistries or
// Config.AllowedRegistries may not be at a loopback, link-local
// (169.254.0.0/16, fe80::/10: cloud metadata), unspecified or cloud
// metadata address: the check runs on the resolved address when dialling
// (a name resolving to 127.0.0.1 is refused too) and on every redirect.
// Config.AllowedRegistries, when set, are the only registries images come
// from (with the insecure ones). Proxies from the environment (HTTPS_PROXY,
// NO_PROXY) are used and dialled as configured. Refusals are
// ErrRegistryNotAllowed. Config.Mirrors are tried before their registry
// and obey the same rules (mirror.go).
//
// Credentials come from the Keychain given to Get (KeychainFromSecrets
// parses a Kubernetes dockerconfigjson or dockercfg pull secret), then,
// as kubelet's keyring, from Config.NodeDockerConfigs and the kubelet
// credential provider plugins of Config.CredentialProviderConfig
// (nodecreds.go, credprovider.go); nothing else, such as $HOME/.docker,
// is read. No error
// message contains a credential, or any text a server sent: messages say
// the HTTP status, the registry's error codes when the distribution spec
// defines them, the kind of network or TLS failure.
//
// # Verification
//
// A layer's compressed bytes are hashed and compared with the digest in
// the manifest, and its uncompressed bytes with the diff ID in the config,
// whose own bytes are checked against the manifest; manifests fetched by
// digest are checked by go-containerregistry, and a local layout's manifest
// against the digest that names it. Every stream is read to its end, so a
// blob is verified even when its tar ends early. Any mismatch, or content
// that does not decode (gzip, zstd, or uncompressed tar), is ErrCorrupt
// and the pull leaves nothing behind.
//
// # Flattening
//
// Layers are applied bottom first into Dir/tmp/pull-*/rootfs. Everything
// is done through the directory descriptor of that root with
// openat2(RESOLVE_BENEATH|RESOLVE_NO_SYMLINKS|RESOLVE_NO_MAGICLINKS|
// RESOLVE_NO_XDEV) and *at calls that never follow the final component:
//
//   - ".wh.NAME" removes NAME made by lower layers; ".wh..wh..opq" removes
//     everything lower layers put in its directory (entries of the same
//     layer stay, whatever their order in the tar). Whiteout files are not
//     kept.
//   - Regular files, directories, symlinks (targets stored as they are:
//     nothing here follows them), FIFOs and hard links (linkat: one inode,
//     within the tree only) are recreated with owner (when running as
//     root), mode including set-id bits, mtime (directories last, deepest
//     first) and the xattrs user.* and security.* (file capabilities)
//     except security.selinux; trusted.* and system.* are dropped.
//   - Device nodes are skipped, as are unknown entry types. The root
//     entry's own metadata is ignored (the root is 0755 root:root).
//   - Refused, failing the whole pull with ErrUnsafe: absolute names, any
//     ".." component, a path through a symlink (even one inside the tree),
//     a hard link to a missing file, a directory or anything outside.
//   - Bounded, failing the whole pull with ErrTooLarge as soon as a bound
//     is passed: the file contents written (counted as written, over all
//     layers) by Config.Budget and by the disk's available space less
//     Config.DiskReserve (looked at again every 16 MiB); the entries (tar
//     headers and the directories made for them) by Config.MaxFiles; names
//     and link targets by Config.MaxPathLength, and names by NAME_MAX.
//     A small gzip layer cannot fill the disk.
//
// The finished tree is measured (disk usage, hard links counted once),
// described in meta.json, flushed with syncfs (unless Config.NoSync) and
// renamed to Dir/images/<algorithm>-<hex> in one step: a tree is either
// complete there or absent. images/ and tmp/ are 0700, so set-id files
// of images are never reachable by host users.
//
// # Concurrency and long pulls
//
// Concurrent Gets resolving to one digest share one pull (singleflight by
// manifest digest). A pull runs on the cache's own context, not the
// caller's: a Get whose ctx ends (kubelet gives a publish about two
// minutes) returns ctx's error while the pull goes on, and the next Get of
// the image joins it or finds it cached. Pulls end with Close, after
// Config.PullTimeout, or when no byte arrived for Config.StallTimeout
// (ErrUnavailable). Progress is called every Config.ProgressInterval while
// a pull runs, so a caller can log a line for slow pulls.
//
// # Collection
//
// After each pull and each Release, while the cache's disk usage is over
// Config.Budget, unpinned images are collected least recently used first
// (their tree is renamed into tmp/ at once and deleted in the background).
// Pinned images never are, so the cache can exceed the budget while they
// are in use; an image whose compressed layers alone exceed the budget is
// refused with ErrCacheFull, one whose flattened contents do with
// ErrTooLarge. GC runs the same collection on demand. Use
// times persist as meta.json's mtime.
//
// # Restart
//
// NewCache takes an flock on Dir/lock (one process per directory), deletes
// tmp/ (half-made pulls, half-deleted images, what a killed pull left) and rebuilds the index from
// images/*/meta.json, dropping anything malformed; refs.json remembers
// which digest each reference last resolved to, so IfNotPresent needs no
// network after a restart. Pins do not survive a restart: re-pin with
// Open before the first Get, Release or GC.
//
// # Errors
//
// Every error wraps at most one sentinel (errors.Is); the driver maps
// them: ErrInvalidArgument and ErrInvalidReference → InvalidArgument,
// ErrNotFound → NotFound, ErrUnauthorized and ErrRegistryNotAllowed (which
// matches ErrUnauthorized) → PermissionDenied,
// ErrUnavailable and ErrClosed → Unavailable, ErrCorrupt → Unavailable
// (a retry pulls again), ErrUnsafe → FailedPrecondition, ErrCacheFull
// and ErrTooLarge (which matches ErrCacheFull) → ResourceExhausted,
// context errors → DeadlineExceeded/Canceled, anything
// else → Internal. ResultOf maps an error to the PullResult used as a
// metrics label.
//
// # Metrics
//
// Stats returns images, bytes, pinned images, pulls in flight, cache hits,
// pulls by result, bytes fetched and pull seconds, and evictions; OnPull
// reports every pull attempt (result, duration, bytes) for histograms.
//
// # Locks
//
// Cache.mu is the only lock and a leaf: under it only the index changes,
// plus renames and the small refs.json write. Flattening, network and
// tree deletion run without it.
package image
