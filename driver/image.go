package driver

import (
	"context"
	"errors"
	"fmt"
	"path/filepath"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/image"
)

// newImageCache opens the node's image cache as cfg says. Pulls report to
// the metrics and, when they take longer than the progress interval, to
// the log.
func newImageCache(cfg *Config, m *metrics, logger logr.Logger) (*image.Cache, error) {
	dir := cfg.ImageCacheDir
	if dir == "" {
		dir = filepath.Join(cfg.StateDir, "images")
	}
	return image.NewCache(image.Config{
		Dir:                dir,
		Budget:             cfg.ImageCacheBudget,
		InsecureRegistries: cfg.InsecureRegistries,
		AllowedRegistries:  cfg.AllowedRegistries,
		CAFile:             cfg.RegistryCAFile,
		NodeDockerConfigs:  cfg.NodeDockerConfigs,
		Mirrors:            cfg.RegistryMirrors,
		Logger:             logger,

		CredentialProviderConfig: cfg.CredentialProviderConfig,
		CredentialProviderBinDir: cfg.CredentialProviderBinDir,
		MaxFiles:                 cfg.ImageMaxFiles,
		MaxPathLength:            cfg.ImageMaxPathLength,
		DiskReserve:              cfg.ImageDiskReserve,
		LocalPrefix:              LocalImagePrefix,
		LocalDir:                 cfg.LocalImagesDir,
		ProgressInterval:         cfg.ImagePullProgressInterval,
		NoSync:                   cfg.imageNoSync,
		Progress: func(p image.Progress) {
			// References name no credentials; nothing here comes from
			// the secrets.
			logger.Info("Pulling image", "image", p.Ref, "digest", p.Digest,
				"layer", p.Layer+1, "layers", p.Layers, "bytes", p.Bytes, "totalBytes", p.TotalBytes,
				"elapsed", p.Elapsed.Round(time.Second))
		},
		OnPull: func(e image.PullEvent) {
			m.observePull(e)
			kv := []any{"image", e.Ref, "digest", e.Digest, "result", e.Result, "bytes", e.Bytes, "duration", e.Duration}
			if e.Err != nil {
				logger.V(1).Info("Image pull failed", append(kv, "err", e.Err)...)
			} else {
				logger.V(1).Info("Pulled image", kv...)
			}
		},
	})
}

// lowerLayer returns the image the volume's image attribute names,
// pinned, and its imagePath directory, the volume's lower directory; nil
// and "" for a pure memory volume. It runs before anything is reserved, so
// a slow pull holds no memory of the budget. The caller releases the
// image once no volume serves the directory.
//
// A pull that outlasts ctx (kubelet gives a publish about two minutes) goes
// on in the cache; the publish fails with DeadlineExceeded and kubelet's
// retry joins the pull or finds the image cached.
func (d *Driver) lowerLayer(ctx context.Context, p volumeParams, secrets map[string]string) (*image.Image, string, error) {
	if p.Image == "" {
		return nil, "", nil
	}
	kc, err := image.KeychainFromSecrets(secrets)
	if err != nil {
		// The message never quotes the secret.
		return nil, "", errorf(codes.InvalidArgument,
			"secrets (nodePublishSecretRef): %v; want a kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg secret", err)
	}
	start := time.Now()
	img, err := d.images.Get(ctx, p.Image, p.PullPolicy.policy, kc)
	if err != nil {
		if ctx.Err() != nil {
			return nil, "", fmt.Errorf("volumeAttributes.%s %q: gave up waiting after %v; the pull goes on and a retry finds it: %w",
				attrImage, p.Image, time.Since(start).Round(time.Millisecond), ctx.Err())
		}
		return nil, "", imageError(attrImage, err)
	}
	dir, err := lowerDir(img, p.ImagePath)
	if err != nil {
		return nil, "", err
	}
	klog.FromContext(ctx).V(4).Info("Image ready", "image", p.Image, "digest", img.Digest, "duration", time.Since(start))
	return img, dir, nil
}

// lowerDir returns the directory imagePath of the pinned image img, a
// volume's lower directory. On failure img is released.
func lowerDir(img *image.Image, imagePath string) (string, error) {
	dir, err := img.Subdir(imagePath)
	if err != nil {
		img.Release()
		return "", imageError(attrImagePath, err)
	}
	return dir, nil
}

// imageError converts an error of the image cache about the attribute attr
// into a coded error (see "Errors" in the image package doc). Errors that
// wrap no sentinel stay uncoded: Internal.
func imageError(attr string, err error) error {
	code := codes.Internal
	switch {
	case errors.Is(err, image.ErrInvalidArgument): // and ErrInvalidReference
		code = codes.InvalidArgument
	case errors.Is(err, image.ErrNotFound):
		code = codes.NotFound
	case errors.Is(err, image.ErrUnauthorized):
		code = codes.PermissionDenied
	case errors.Is(err, image.ErrUnavailable), errors.Is(err, image.ErrClosed), errors.Is(err, image.ErrCorrupt):
		code = codes.Unavailable
	case errors.Is(err, image.ErrUnsafe):
		code = codes.FailedPrecondition
	case errors.Is(err, image.ErrCacheFull):
		code = codes.ResourceExhausted
	default:
		return fmt.Errorf("volumeAttributes.%s: %w", attr, err)
	}
	return errorf(code, "volumeAttributes.%s: %v", attr, err)
}

// repin pins again the image of a volume recorded by a previous process,
// before anything can collect it. A missing image is logged: the volume's
// memory layer is still unpublished normally.
func (d *Driver) repin(logger logr.Logger, r record) *image.Image {
	if r.ImageDigest == "" {
		return nil
	}
	img, err := d.images.Open(r.ImageDigest)
	if err != nil {
		logger.Info("The image of a volume of a previous plugin process is not in the cache",
			"volumeID", r.VolumeID, "image", r.Spec.Params.Image, "digest", r.ImageDigest, "err", err)
		return nil
	}
	return img
}

// ImagePull is the image of a volume outside Kubernetes (`csi-memfs mount
// --image`), which PullImage gets from an image cache of its own as the
// plugin gets a volume's.
type ImagePull struct {
	// Image is the image's reference, or LocalImagePrefix+NAME[:TAG] for
	// a local image.
	Image string
	// ImagePath is the directory of the image used as the volume root.
	ImagePath string
	// PullPolicy says when Image is pulled; the zero value is
	// IfNotPresent.
	PullPolicy PullPolicy
	// PullSecret is a Docker config.json, or a .dockerconfigjson pull
	// secret's content, with registry credentials; nil: anonymous.
	PullSecret []byte
	// CacheDir is the directory of the image cache, which one process at
	// a time uses.
	CacheDir string
	// InsecureRegistries, AllowedRegistries and RegistryCAFile are as in
	// Config.
	InsecureRegistries []string
	AllowedRegistries  []string
	RegistryCAFile     string
	// NodeDockerConfigs and RegistryMirrors are as in Config.
	NodeDockerConfigs []string
	RegistryMirrors   map[string][]string
	// LocalImagesDir holds the local images Image may name; empty: none.
	LocalImagesDir string
	// Progress, if set, is called every few seconds while a pull runs,
	// with the layer being fetched (from 0) of layers, and the bytes
	// fetched of totalBytes.
	Progress func(ref string, layer, layers int, bytes, totalBytes int64)
}

// PullError is PullImage's error: Field names the ImagePull field at
// fault.
type PullError struct {
	Field string
	Err   error
}

func (e *PullError) Error() string { return e.Field + ": " + e.Err.Error() }

func (e *PullError) Unwrap() error { return e.Err }

// PulledImage is an image PullImage got, pinned in its cache.
type PulledImage struct {
	// Dir is the image's ImagePath directory: a volume's lower
	// directory. Immutable.
	Dir string
	// cache is the open cache, and img the image pinned in it. Immutable.
	cache *image.Cache
	img   *image.Image
}

// Close unpins the image and closes the cache. Call it once nothing
// serves Dir.
func (p *PulledImage) Close() error {
	p.img.Release()
	return p.cache.Close()
}

// PullImage opens the image cache p.CacheDir and gets p.Image from it,
// pulling it if needed; ctx abandons the pull. The cache stays open (and
// locked) until Close, so that no other process collects the image. A
// failure is a *PullError.
func PullImage(ctx context.Context, p ImagePull) (*PulledImage, error) {
	secrets := map[string]string{}
	if p.PullSecret != nil {
		secrets[image.DockerConfigJSONKey] = string(p.PullSecret)
	}
	kc, err := image.KeychainFromSecrets(secrets)
	if err != nil {
		return nil, &PullError{"PullSecret", err}
	}
	cfg := image.Config{
		Dir:                p.CacheDir,
		InsecureRegistries: p.InsecureRegistries,
		AllowedRegistries:  p.AllowedRegistries,
		CAFile:             p.RegistryCAFile,
		NodeDockerConfigs:  p.NodeDockerConfigs,
		Mirrors:            p.RegistryMirrors,
		LocalPrefix:        LocalImagePrefix,
		LocalDir:           p.LocalImagesDir,
	}
	if p.Progress != nil {
		cfg.Progress = func(pr image.Progress) { p.Progress(pr.Ref, pr.Layer, pr.Layers, pr.Bytes, pr.TotalBytes) }
	}
	cache, err := image.NewCache(cfg)
	if err != nil {
		return nil, &PullError{"CacheDir", err}
	}
	img, err := cache.Get(ctx, p.Image, p.PullPolicy.policy, kc)
	if err != nil {
		cache.Close()
		return nil, &PullError{"Image", err}
	}
	dir, err := img.Subdir(p.ImagePath)
	if err != nil {
		img.Release()
		cache.Close()
		return nil, &PullError{"ImagePath", err}
	}
	return &PulledImage{Dir: dir, cache: cache, img: img}, nil
}
