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
	"github.com/csi-memfs/csi-memfs/overlay"
)

// LocalImagePrefix starts the image attribute of a local image: "oci:NAME",
// "oci:NAME:TAG" or "oci:NAME@DIGEST" name the OCI image layout directory
// or image tarball NAME under Config.LocalImagesDir.
const LocalImagePrefix = "oci:"

// lowerImage is the lower layer of an image volume: the pinned image and a
// Lower over its imagePath directory. Close releases both.
type lowerImage struct {
	// img is the pinned image. Immutable.
	img *image.Image
	// dir is a Lower over img's imagePath directory. Immutable.
	dir *overlay.DirLower
}

// close closes the Lower and unpins the image. It may be called more than
// once.
func (l *lowerImage) close() error {
	if l == nil {
		return nil
	}
	var err error
	if l.dir != nil {
		err = l.dir.Close()
		l.dir = nil
	}
	l.img.Release()
	return err
}

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
		LocalPrefix:        LocalImagePrefix,
		LocalDir:           cfg.LocalImagesDir,
		ProgressInterval:   cfg.ImagePullProgressInterval,
		NoSync:             cfg.imageNoSync,
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

// lowerLayer returns the read-only lower layer the volume's image gives, or
// nil for a pure memory volume. It runs before anything is reserved, so a
// slow pull holds no memory of the budget. The caller closes the result.
//
// A pull that outlasts ctx (kubelet gives a publish about two minutes) goes
// on in the cache; the publish fails with DeadlineExceeded and kubelet's
// retry joins the pull or finds the image cached.
func (d *Driver) lowerLayer(ctx context.Context, p volumeParams, secrets map[string]string) (*lowerImage, error) {
	if p.Image == "" {
		return nil, nil
	}
	kc, err := image.KeychainFromSecrets(secrets)
	if err != nil {
		// The message never quotes the secret.
		return nil, errorf(codes.InvalidArgument,
			"secrets (nodePublishSecretRef): %v; want a kubernetes.io/dockerconfigjson or kubernetes.io/dockercfg secret", err)
	}
	policy, err := image.ParsePullPolicy(string(p.PullPolicy))
	if err != nil {
		return nil, imageError(attrImagePullPolicy, err)
	}
	start := time.Now()
	img, err := d.images.Get(ctx, p.Image, policy, kc)
	if err != nil {
		if ctx.Err() != nil {
			return nil, fmt.Errorf("volumeAttributes.%s %q: gave up waiting after %v; the pull goes on and a retry finds it: %w",
				attrImage, p.Image, time.Since(start).Round(time.Millisecond), ctx.Err())
		}
		return nil, imageError(attrImage, err)
	}
	lower, err := d.openLower(img, p.ImagePath)
	if err != nil {
		return nil, err
	}
	klog.FromContext(ctx).V(4).Info("Image ready", "image", p.Image, "digest", img.Digest, "duration", time.Since(start))
	return lower, nil
}

// openLower opens the directory imagePath of the pinned image img as a
// lower layer. On failure img is released.
func (d *Driver) openLower(img *image.Image, imagePath string) (*lowerImage, error) {
	root, err := img.Subdir(imagePath)
	if err != nil {
		img.Release()
		return nil, imageError(attrImagePath, err)
	}
	dir, err := overlay.NewDirLower(root)
	if err != nil {
		img.Release()
		return nil, fmt.Errorf("volumeAttributes.%s %q of image %s: %w", attrImagePath, imagePath, img.Digest, err)
	}
	return &lowerImage{img: img, dir: dir}, nil
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
