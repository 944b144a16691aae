package driver

import (
	"fmt"
	"path"
	"regexp"
	"slices"
	"sort"
	"strconv"
	"strings"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"k8s.io/apimachinery/pkg/api/resource"

	"github.com/csi-memfs/csi-memfs/image"
)

// The volumeAttributes keys of a csi-memfs volume (README.md, "Volume attributes").
const (
	attrImage           = "image"
	attrImagePullPolicy = "imagePullPolicy"
	attrImagePath       = "imagePath"
	attrSize            = "size"
	attrInodes          = "inodes"
	attrSeal            = "seal"
	attrNoSwap          = "noswap"
	attrKernelCache     = "kernelCache"
)

// minVolumeSize is the smallest size a volume may have: below it, tmpfs
// rounds up to whole pages and the memory layer's own files crowd out the
// pod's.
const minVolumeSize = 1 << 20

// The keys kubelet adds to an inline volume's attributes. Every key under
// kubeletPrefix is accepted; these are the ones the driver reads or hides.
const (
	kubeletPrefix   = "csi.storage.k8s.io/"
	attrEphemeral   = kubeletPrefix + "ephemeral"
	attrPodName     = kubeletPrefix + "pod.name"
	attrPodNS       = kubeletPrefix + "pod.namespace"
	attrPodUID      = kubeletPrefix + "pod.uid"
	attrTokens      = kubeletPrefix + "serviceAccount.tokens" // credentials: never logged
	defaultImageDir = "/"
)

// LocalImagePrefix starts the image attribute of a local image: "oci:NAME",
// "oci:NAME:TAG" or "oci:NAME@DIGEST" name the OCI image layout directory
// or image tarball NAME under Config.LocalImagesDir.
const LocalImagePrefix = "oci:"

// knownAttrs lists the user-facing keys, in the order error messages name them.
var knownAttrs = []string{attrImage, attrImagePullPolicy, attrImagePath, attrSize, attrInodes, attrSeal, attrNoSwap, attrKernelCache}

// PullPolicy says when an image is pulled: Kubernetes' imagePullPolicy,
// parsed once (ParsePullPolicy) into what the image cache takes. The zero
// value is no policy, that of a volume without an image; the image cache
// takes it as IfNotPresent. It is recorded as Kubernetes spells it.
type PullPolicy struct {
	// policy is the parsed policy. Immutable.
	policy image.PullPolicy
	// set is false for the zero value. Immutable.
	set bool
}

// ParsePullPolicy parses Always, IfNotPresent or Never.
func ParsePullPolicy(s string) (PullPolicy, bool) {
	if s == "" {
		return PullPolicy{}, false
	}
	p, err := image.ParsePullPolicy(s)
	return PullPolicy{policy: p, set: true}, err == nil
}

// defaultPullPolicy is the policy of an image volume without an
// imagePullPolicy attribute.
var defaultPullPolicy = PullPolicy{policy: image.PullIfNotPresent, set: true}

// String returns the policy as Kubernetes spells it; "" for none.
func (p PullPolicy) String() string {
	if !p.set {
		return ""
	}
	return p.policy.String()
}

// IsZero says whether p is no policy (encoding/json's omitzero).
func (p PullPolicy) IsZero() bool { return !p.set }

// MarshalText records p as Kubernetes spells it.
func (p PullPolicy) MarshalText() ([]byte, error) { return []byte(p.String()), nil }

// UnmarshalText reads a recorded policy.
func (p *PullPolicy) UnmarshalText(b []byte) error {
	if len(b) == 0 {
		*p = PullPolicy{}
		return nil
	}
	q, ok := ParsePullPolicy(string(b))
	if !ok {
		return fmt.Errorf("imagePullPolicy %q: want Always, IfNotPresent or Never", b)
	}
	*p = q
	return nil
}

// publishSpec is everything a NodePublishVolume asks for, validated. Two
// publishes of one volume are the same request exactly when their specs
// are equal.
type publishSpec struct {
	// TargetPath is the absolute, cleaned path kubelet mounts the pod's
	// volume from.
	TargetPath string `json:"targetPath"`
	// Params are the volume's attributes.
	Params volumeParams `json:"params"`
	// ReadOnly mounts the volume read-only.
	ReadOnly bool `json:"readOnly,omitempty"`
	// MountGroup is the gid that owns the volume's root directory, from
	// volume_mount_group; nil for none. Recorded as a decimal string.
	MountGroup *uint32 `json:"mountGroup,omitempty,string"`
	// AccessMode is the capability's access mode.
	AccessMode csi.VolumeCapability_AccessMode_Mode `json:"accessMode"`
}

// difference names the first field in which s and t differ, or "".
func (s publishSpec) difference(t publishSpec) string {
	switch {
	case s.TargetPath != t.TargetPath:
		return "target_path"
	case !s.Params.equal(t.Params):
		return "volume_context (volumeAttributes)"
	case s.ReadOnly != t.ReadOnly:
		return "readonly"
	case !equalGroup(s.MountGroup, t.MountGroup):
		return "volume_capability.mount.volume_mount_group"
	case s.AccessMode != t.AccessMode:
		return "volume_capability.access_mode"
	}
	return ""
}

// equalGroup says whether two mount groups are the same.
func equalGroup(g, h *uint32) bool {
	return (g == nil) == (h == nil) && (g == nil || *g == *h)
}

// volumeParams are a volume's volumeAttributes, parsed and validated. The
// zero value is not valid; parseVolumeParams fills every field.
type volumeParams struct {
	// Image is the OCI reference of the lower layer; empty for a pure
	// memory volume.
	Image string `json:"image,omitempty"`
	// PullPolicy says when Image is pulled; the zero value without an
	// Image.
	PullPolicy PullPolicy `json:"imagePullPolicy,omitzero"`
	// ImagePath is the directory of the image used as the lower root:
	// slash-separated, cleaned, starting with "/".
	ImagePath string `json:"imagePath,omitempty"`
	// Size is the byte limit of the upper layer.
	// Invariant: 0 < Size <= the driver's maximum size.
	Size int64 `json:"size"`
	// Inodes is the inode limit of the upper layer. Records of earlier
	// versions may hold 0: memfs chooses (one per 4 KiB of Size, at least
	// 1024).
	Inodes uint64 `json:"inodes,omitempty"`
	// NoSwap keeps the volume's pages out of swap.
	NoSwap bool `json:"noSwap,omitempty"`
	// KernelCache has the kernel open the files of a read-only volume
	// without a FUSE request and keep what was read cached across opens
	// (volume.Config.KernelCache). Only a read-only publish may ask for it
	// (publishRequest refuses it on a writable one).
	KernelCache bool `json:"kernelCache,omitempty"`
	// Seal lists the globs (path.Match syntax, relative to the volume root,
	// cleaned) of files sealed at publish.
	Seal []string `json:"seal,omitempty"`
}

// attributes renders p as the attributes parseParams reads back as p:
// the volume_context of a volume CreateVolume made, every value explicit.
func (p volumeParams) attributes() map[string]string {
	a := map[string]string{
		attrSize:   strconv.FormatInt(p.Size, 10),
		attrInodes: strconv.FormatUint(p.Inodes, 10),
	}
	if p.NoSwap {
		a[attrNoSwap] = "true"
	}
	if p.KernelCache {
		a[attrKernelCache] = "true"
	}
	if len(p.Seal) > 0 {
		a[attrSeal] = strings.Join(p.Seal, ",")
	}
	if p.Image != "" {
		a[attrImage] = p.Image
		a[attrImagePullPolicy] = p.PullPolicy.String()
		a[attrImagePath] = p.ImagePath
	}
	return a
}

// equal says whether p and q describe the same volume.
func (p volumeParams) equal(q volumeParams) bool {
	return p.Image == q.Image && p.PullPolicy == q.PullPolicy && p.ImagePath == q.ImagePath &&
		p.Size == q.Size && p.Inodes == q.Inodes && p.NoSwap == q.NoSwap && p.KernelCache == q.KernelCache && slices.Equal(p.Seal, q.Seal)
}

// podInfo names the pod a volume belongs to, from the attributes kubelet
// adds (podInfoOnMount). Fields are empty when kubelet did not send them.
type podInfo struct {
	Namespace string `json:"namespace,omitempty"`
	Name      string `json:"name,omitempty"`
	UID       string `json:"uid,omitempty"`
}

// podOf reads the pod kubelet names in a volume's attributes, valid or
// not: a refused publish is logged with it.
func podOf(attrs map[string]string) podInfo {
	return podInfo{Namespace: attrs[attrPodNS], Name: attrs[attrPodName], UID: attrs[attrPodUID]}
}

// limits are the operator's bounds on volumeAttributes (from flags).
type limits struct {
	// DefaultSize is the Size of a volume without a size attribute.
	DefaultSize int64
	// MaxSize bounds Size.
	MaxSize int64
	// DefaultInodes is the Inodes of a volume without an inodes attribute
	// (0: one per 4 KiB of size, at least 1024, at most MaxInodes).
	DefaultInodes uint64
	// MaxInodes bounds Inodes. Invariant: MaxInodes > 0.
	MaxInodes uint64
}

// attrProvisioned marks the volume_context CreateVolume returns: a volume
// of a StorageClass, which NodePublishVolume takes like an inline one.
const attrProvisioned = "memfs.csi.dev/provisioned"

// parseVolumeParams validates the attributes NodePublishVolume gets: those
// of an inline ephemeral volume, or the volume_context of a volume
// CreateVolume made. Every error is an InvalidArgument naming the key and
// the values it accepts.
func parseVolumeParams(attrs map[string]string, lim limits) (volumeParams, podInfo, error) {
	if err := checkKeys(attrs, attrProvisioned); err != nil {
		return volumeParams{}, podInfo{}, err
	}
	if attrs[attrEphemeral] != "true" && attrs[attrProvisioned] != "true" {
		return volumeParams{}, podInfo{}, errorf(codes.InvalidArgument,
			"volumeAttributes[%s] is %q, want \"true\": csi-memfs serves inline ephemeral volumes "+
				"(a csi volume in the pod spec, with a CSIDriver whose volumeLifecycleModes has Ephemeral) "+
				"and volumes of its own StorageClasses (whose volume_context has %s=true)",
			attrEphemeral, attrs[attrEphemeral], attrProvisioned)
	}
	p, err := parseParams(attrs, lim)
	if err != nil {
		return volumeParams{}, podInfo{}, err
	}
	return p, podOf(attrs), nil
}

// checkKeys refuses a key that is neither a user-facing one, one under
// kubeletPrefix, nor one of extra.
func checkKeys(attrs map[string]string, extra ...string) error {
	var unknown []string
	for k := range attrs {
		if !slices.Contains(knownAttrs, k) && !slices.Contains(extra, k) && !strings.HasPrefix(k, kubeletPrefix) {
			unknown = append(unknown, k)
		}
	}
	if len(unknown) > 0 {
		sort.Strings(unknown)
		return errorf(codes.InvalidArgument,
			"volumeAttributes: unknown key %q; known keys are %s (and the %s* keys kubelet adds)",
			unknown[0], strings.Join(knownAttrs, ", "), kubeletPrefix)
	}
	return nil
}

// parseParams parses the user-facing keys of attrs, whose keys are
// checked. Shared by NodePublishVolume (volumeAttributes), CreateVolume
// and GetCapacity (StorageClass parameters).
func parseParams(attrs map[string]string, lim limits) (volumeParams, error) {
	p := volumeParams{Size: lim.DefaultSize, Inodes: lim.DefaultInodes}
	var err error
	if v, ok := attrs[attrSize]; ok {
		if p.Size, err = parseSize(v, lim.MaxSize); err != nil {
			return volumeParams{}, err
		}
	}
	if v, ok := attrs[attrInodes]; ok {
		if p.Inodes, err = parseInodes(v, lim.MaxInodes); err != nil {
			return volumeParams{}, err
		}
	} else if p.Inodes == 0 {
		p.Inodes = min(max(uint64(p.Size)/4096, 1024), lim.MaxInodes)
	}
	if p.NoSwap, err = boolAttr(attrs, attrNoSwap, "keep the volume's memory out of swap; Linux 6.4 or later"); err != nil {
		return volumeParams{}, err
	}
	if p.KernelCache, err = boolAttr(attrs, attrKernelCache, "a read-only volume whose files the kernel opens and caches without asking the plugin"); err != nil {
		return volumeParams{}, err
	}
	if v, ok := attrs[attrSeal]; ok {
		if p.Seal, err = parseSealGlobs(v); err != nil {
			return volumeParams{}, err
		}
	}

	p.Image = attrs[attrImage]
	// A local image (oci:NAME) is checked by the image cache, which alone
	// knows where local images are.
	if p.Image != "" && !strings.HasPrefix(p.Image, LocalImagePrefix) && !validImageRef(p.Image) {
		return volumeParams{}, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %q is not an OCI image reference; want repo:tag or repo@sha256:<hex> "+
				"(e.g. registry.example/team/app:1.2), or %sNAME[:TAG] for a local image", attrImage, p.Image, LocalImagePrefix)
	}
	_, hasPolicy := attrs[attrImagePullPolicy]
	_, hasPath := attrs[attrImagePath]
	if p.Image == "" && (hasPolicy || hasPath) {
		key := attrImagePullPolicy
		if !hasPolicy {
			key = attrImagePath
		}
		return volumeParams{}, errorf(codes.InvalidArgument,
			"volumeAttributes.%s is set but %s is empty; set %s, or drop %s for a pure memory volume",
			key, attrImage, attrImage, key)
	}
	if p.Image != "" {
		p.PullPolicy = defaultPullPolicy
		if v, ok := attrs[attrImagePullPolicy]; ok {
			if p.PullPolicy, ok = ParsePullPolicy(v); !ok {
				return volumeParams{}, errorf(codes.InvalidArgument,
					"volumeAttributes.%s: %q is not a pull policy; want Always, IfNotPresent or Never",
					attrImagePullPolicy, v)
			}
		}
		p.ImagePath = defaultImageDir
		if v, ok := attrs[attrImagePath]; ok {
			if p.ImagePath, err = parseImagePath(v); err != nil {
				return volumeParams{}, err
			}
		}
	}
	return p, nil
}

// parseSize parses a size attribute: a Kubernetes quantity from
// minVolumeSize to max.
func parseSize(v string, max int64) (int64, error) {
	q, err := resource.ParseQuantity(v)
	if err != nil || q.Sign() <= 0 {
		return 0, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %q is not a positive Kubernetes quantity; want e.g. 64Mi or 1Gi (%s to %s)",
			attrSize, v, quantityString(minVolumeSize), quantityString(max))
	}
	if q.CmpInt64(minVolumeSize) < 0 {
		return 0, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %s is less than the smallest volume, %s", attrSize, v, quantityString(minVolumeSize))
	}
	if q.Cmp(*resource.NewQuantity(max, resource.BinarySI)) > 0 {
		return 0, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %s is more than this node allows per volume (%s, flag --max-volume-size)",
			attrSize, v, quantityString(max))
	}
	return q.Value(), nil
}

// parseInodes parses an inodes attribute: a positive whole number (plain or
// a quantity such as 10k) no larger than max.
func parseInodes(v string, max uint64) (uint64, error) {
	q, err := resource.ParseQuantity(v)
	if err != nil || q.Sign() <= 0 || q.CmpInt64(q.Value()) != 0 {
		return 0, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %q is not a positive whole number; want e.g. 4096 or 100k", attrInodes, v)
	}
	n := uint64(q.Value())
	if n > max {
		return 0, errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %s is more than this node allows per volume (%d, flag --max-volume-inodes)",
			attrInodes, v, max)
	}
	return n, nil
}

// parseSealGlobs parses a seal attribute: comma-separated globs in
// path.Match syntax, relative to the volume root ("/" in front is
// dropped). Empty entries are ignored.
func parseSealGlobs(v string) ([]string, error) {
	var globs []string
	for _, g := range strings.Split(v, ",") {
		g = strings.TrimSpace(g)
		if g == "" {
			continue
		}
		clean := strings.TrimPrefix(path.Clean("/"+g), "/")
		_, err := path.Match(clean, "")
		if clean == "" || err != nil || slices.Contains(strings.Split(g, "/"), "..") || strings.ContainsRune(g, 0) {
			return nil, errorf(codes.InvalidArgument,
				"volumeAttributes.%s: %q is not a file glob; want comma-separated globs relative to the volume root "+
					"in shell syntax (*, ?, [a-z]; no \"..\"), e.g. \"config/*.json,bin/app\"", attrSeal, g)
		}
		globs = append(globs, clean)
	}
	return globs, nil
}

// parseImagePath parses an imagePath attribute: a directory of the image,
// without "..".
func parseImagePath(v string) (string, error) {
	if v == "" || strings.ContainsRune(v, 0) || slices.Contains(strings.Split(v, "/"), "..") {
		return "", errorf(codes.InvalidArgument,
			"volumeAttributes.%s: %q is not a directory of the image; want a path such as / or /usr/share/data (no \"..\")",
			attrImagePath, v)
	}
	return path.Clean("/" + v), nil
}

// imageRefRE is the OCI distribution reference grammar: an optional
// registry host[:port], slash-separated lower-case path components, then an
// optional :tag and an optional @algorithm:hex digest.
var imageRefRE = func() *regexp.Regexp {
	const (
		alnum      = `[a-z0-9]+`
		separator  = `(?:[._]|__|[-]+)`
		component  = alnum + `(?:` + separator + alnum + `)*`
		domainPart = `(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])`
		domain     = `(?:` + domainPart + `(?:\.` + domainPart + `)*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?`
		name       = `(?:` + domain + `/)?` + component + `(?:/` + component + `)*`
		tag        = `[\w][\w.-]{0,127}`
		digest     = `[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,}`
	)
	return regexp.MustCompile(`^` + name + `(?::` + tag + `)?(?:@` + digest + `)?$`)
}()

// validImageRef says whether ref is an OCI image reference.
func validImageRef(ref string) bool {
	name, _, _ := strings.Cut(ref, "@")
	if i := strings.LastIndex(name, ":"); i > strings.LastIndex(name, "/") {
		name = name[:i]
	}
	return len(name) <= 255 && imageRefRE.MatchString(ref)
}

// quantityString prints n bytes as a binary Kubernetes quantity (64Mi).
func quantityString(n int64) string {
	return resource.NewQuantity(n, resource.BinarySI).String()
}

// boolAttr parses the boolean attribute key, false when absent; meaning
// says what "true" asks for, in the error a bad value gets.
func boolAttr(attrs map[string]string, key, meaning string) (bool, error) {
	switch v, ok := attrs[key]; {
	case !ok || v == "false":
		return false, nil
	case v == "true":
		return true, nil
	default:
		return false, errorf(codes.InvalidArgument, "volumeAttributes.%s: %q; want \"true\" (%s) or \"false\"", key, v, meaning)
	}
}
