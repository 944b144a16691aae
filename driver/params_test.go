package driver

import (
	"encoding/json"
	"reflect"
	"strings"
	"testing"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/status"

	"github.com/csi-memfs/csi-memfs/image"
)

func TestParseVolumeParams(t *testing.T) {
	lim := limits{DefaultSize: 64 << 20, MaxSize: 1 << 30, MaxInodes: 1 << 20}
	base := volumeParams{Size: 64 << 20, Inodes: 16384}
	with := func(f func(*volumeParams)) volumeParams { p := base; f(&p); return p }
	tests := []struct {
		name  string
		attrs map[string]string
		want  volumeParams
		code  codes.Code
		msg   string // part of the error message
	}{
		{name: "defaults", attrs: attrs(), want: base},
		{name: "size", attrs: attrs("size", "16Mi"), want: with(func(p *volumeParams) { p.Size, p.Inodes = 16<<20, 4096 })},
		{name: "size decimal", attrs: attrs("size", "2M"), want: with(func(p *volumeParams) { p.Size, p.Inodes = 2000000, 1024 })},
		{name: "size max", attrs: attrs("size", "1Gi"), want: with(func(p *volumeParams) { p.Size, p.Inodes = 1<<30, 262144 })},
		{name: "size fraction rounds up", attrs: attrs("size", "1.5Mi"), want: with(func(p *volumeParams) { p.Size, p.Inodes = 1536<<10, 1024 })},
		{name: "size minimum", attrs: attrs("size", "1Mi"), want: with(func(p *volumeParams) { p.Size, p.Inodes = 1<<20, 1024 })},
		{name: "noswap", attrs: attrs("noswap", "true"), want: with(func(p *volumeParams) { p.NoSwap = true })},
		{name: "noswap false", attrs: attrs("noswap", "false"), want: base},
		{name: "kernelCache", attrs: attrs("kernelCache", "true"), want: with(func(p *volumeParams) { p.KernelCache = true })},
		{name: "kernelCache false", attrs: attrs("kernelCache", "false"), want: base},
		{name: "inodes", attrs: attrs("inodes", "4096"), want: with(func(p *volumeParams) { p.Inodes = 4096 })},
		{name: "inodes quantity", attrs: attrs("inodes", "10k"), want: with(func(p *volumeParams) { p.Inodes = 10000 })},
		{name: "seal", attrs: attrs("seal", " config/*.json, /bin/app ,,"),
			want: with(func(p *volumeParams) { p.Seal = []string{"config/*.json", "bin/app"} })},
		{name: "image", attrs: attrs("image", "registry.example:5000/team/app:1.2"),
			want: with(func(p *volumeParams) {
				p.Image, p.PullPolicy, p.ImagePath = "registry.example:5000/team/app:1.2", PullPolicy{policy: image.PullIfNotPresent, set: true}, "/"
			})},
		{name: "image digest policy path", attrs: attrs("image", "busybox@sha256:"+strings.Repeat("ab", 32),
			"imagePullPolicy", "Never", "imagePath", "usr/share/"),
			want: with(func(p *volumeParams) {
				p.Image, p.PullPolicy, p.ImagePath = "busybox@sha256:"+strings.Repeat("ab", 32), PullPolicy{policy: image.PullNever, set: true}, "/usr/share"
			})},
		{name: "kubelet keys ignored", attrs: attrs(kubeletPrefix+"serviceAccount.tokens", "{}"), want: base},

		{name: "not ephemeral", attrs: map[string]string{"size": "1Mi"}, code: codes.InvalidArgument, msg: "ephemeral"},
		{name: "ephemeral false", attrs: attrs(attrEphemeral, "false"), code: codes.InvalidArgument, msg: "inline ephemeral"},
		{name: "unknown key", attrs: attrs("sise", "1Mi"), code: codes.InvalidArgument, msg: `unknown key "sise"; known keys are image, imagePullPolicy, imagePath, size, inodes, seal, noswap, kernelCache`},
		{name: "size garbage", attrs: attrs("size", "lots"), code: codes.InvalidArgument, msg: "volumeAttributes.size"},
		{name: "size zero", attrs: attrs("size", "0"), code: codes.InvalidArgument, msg: "positive"},
		{name: "size negative", attrs: attrs("size", "-1Mi"), code: codes.InvalidArgument, msg: "positive"},
		{name: "size below the minimum", attrs: attrs("size", "1"), code: codes.InvalidArgument, msg: "volumeAttributes.size: 1 is less than the smallest volume, 1Mi"},
		{name: "noswap garbage", attrs: attrs("noswap", "yes"), code: codes.InvalidArgument, msg: "volumeAttributes.noswap"},
		{name: "kernelCache garbage", attrs: attrs("kernelCache", "1"), code: codes.InvalidArgument, msg: "volumeAttributes.kernelCache"},
		{name: "size too big", attrs: attrs("size", "2Gi"), code: codes.InvalidArgument, msg: "at most|more than this node allows"},
		{name: "size huge", attrs: attrs("size", "1E"), code: codes.InvalidArgument, msg: "--max-volume-size"},
		{name: "inodes fraction", attrs: attrs("inodes", "1.5"), code: codes.InvalidArgument, msg: "volumeAttributes.inodes"},
		{name: "inodes zero", attrs: attrs("inodes", "0"), code: codes.InvalidArgument, msg: "whole number"},
		{name: "inodes too many", attrs: attrs("inodes", "2Mi"), code: codes.InvalidArgument, msg: "--max-volume-inodes"},
		{name: "seal bad glob", attrs: attrs("seal", "a/[b"), code: codes.InvalidArgument, msg: "volumeAttributes.seal"},
		{name: "seal dotdot", attrs: attrs("seal", "../etc/*"), code: codes.InvalidArgument, msg: `no ".."`},
		{name: "seal root", attrs: attrs("seal", "/"), code: codes.InvalidArgument, msg: "not a file glob"},
		{name: "image bad", attrs: attrs("image", "Not A Ref"), code: codes.InvalidArgument, msg: "volumeAttributes.image"},
		{name: "image upper case repo", attrs: attrs("image", "Busybox:1"), code: codes.InvalidArgument, msg: "OCI image reference"},
		{name: "image short digest", attrs: attrs("image", "busybox@sha256:abc"), code: codes.InvalidArgument, msg: "OCI image reference"},
		{name: "policy bad", attrs: attrs("image", "busybox", "imagePullPolicy", "always"), code: codes.InvalidArgument,
			msg: "want Always, IfNotPresent or Never"},
		{name: "policy without image", attrs: attrs("imagePullPolicy", "Always"), code: codes.InvalidArgument, msg: "image is empty"},
		{name: "path without image", attrs: attrs("imagePath", "/x"), code: codes.InvalidArgument, msg: "volumeAttributes.imagePath is set"},
		{name: "path dotdot", attrs: attrs("image", "busybox", "imagePath", "/a/../.."), code: codes.InvalidArgument, msg: "volumeAttributes.imagePath"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got, pod, err := parseVolumeParams(tt.attrs, lim)
			code := status.Code(toStatus(err))
			if code != tt.code {
				t.Fatalf("code = %v (%v), want %v", code, err, tt.code)
			}
			if err != nil {
				if !matchesAny(err.Error(), tt.msg) {
					t.Errorf("message %q does not say %q", err, tt.msg)
				}
				return
			}
			if !reflect.DeepEqual(got, tt.want) {
				t.Errorf("params = %+v, want %+v", got, tt.want)
			}
			if pod.Namespace != "default" || pod.Name != "pod-1" {
				t.Errorf("pod = %+v", pod)
			}
		})
	}
}

// matchesAny says whether s contains one of the |-separated parts of want.
func matchesAny(s, want string) bool {
	for _, w := range strings.Split(want, "|") {
		if strings.Contains(s, w) {
			return true
		}
	}
	return false
}

func TestVolumeIDs(t *testing.T) {
	for _, id := range []string{"csi-" + strings.Repeat("0a", 32), "fake-vol-id-0123456789", "a", "A.b_c-d"} {
		if err := validVolumeID(id); err != nil {
			t.Errorf("validVolumeID(%q) = %v", id, err)
		}
	}
	for _, id := range []string{"", ".", "..", "../x", "a/b", "-a", strings.Repeat("a", 129), "a\x00"} {
		if code := status.Code(toStatus(validVolumeID(id))); code != codes.InvalidArgument {
			t.Errorf("validVolumeID(%q): code %v, want InvalidArgument", id, code)
		}
	}
}

func TestImageRefs(t *testing.T) {
	good := []string{"busybox", "busybox:1.36", "library/busybox", "docker.io/library/busybox:latest",
		"localhost:5000/a/b-c_d.e:v1", "[::1]:5000/x", "x@sha256:" + strings.Repeat("0", 64),
		"x:tag@sha256:" + strings.Repeat("0", 64)}
	bad := []string{"", "UPPER", "a b", "x:", ":tag", "x@sha256:xyz", "-x", "x//y", strings.Repeat("a", 256)}
	for _, r := range good {
		if !validImageRef(r) {
			t.Errorf("validImageRef(%q) = false", r)
		}
	}
	for _, r := range bad {
		if validImageRef(r) {
			t.Errorf("validImageRef(%q) = true", r)
		}
	}
}

// TestPublishSpecRecord: the parsed pull policy and mount group are
// recorded as the strings a pod spec has, so that records of earlier
// versions read the same and earlier versions read ours.
func TestPublishSpecRecord(t *testing.T) {
	for _, tc := range []struct {
		spec publishSpec
		json string
	}{
		{publishSpec{TargetPath: "/t", Params: volumeParams{Size: 1}, AccessMode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			`{"targetPath":"/t","params":{"size":1},"accessMode":1}`},
		{publishSpec{TargetPath: "/t", Params: volumeParams{Image: "busybox", PullPolicy: defaultPullPolicy, ImagePath: "/", Size: 1},
			MountGroup: new(uint32(0)), AccessMode: csi.VolumeCapability_AccessMode_SINGLE_NODE_WRITER},
			`{"targetPath":"/t","params":{"image":"busybox","imagePullPolicy":"IfNotPresent","imagePath":"/","size":1},"mountGroup":"0","accessMode":1}`},
		{publishSpec{TargetPath: "/t", Params: volumeParams{Image: "busybox", PullPolicy: PullPolicy{policy: image.PullNever, set: true}, ImagePath: "/", Size: 1},
			MountGroup: new(uint32(3000)), ReadOnly: true, AccessMode: csi.VolumeCapability_AccessMode_SINGLE_NODE_READER_ONLY},
			`{"targetPath":"/t","params":{"image":"busybox","imagePullPolicy":"Never","imagePath":"/","size":1},"readOnly":true,"mountGroup":"3000","accessMode":2}`},
	} {
		b, err := json.Marshal(tc.spec)
		if err != nil || string(b) != tc.json {
			t.Errorf("%+v: %s, %v; want %s", tc.spec, b, err, tc.json)
		}
		var back publishSpec
		if err := json.Unmarshal([]byte(tc.json), &back); err != nil || back.difference(tc.spec) != "" {
			t.Errorf("%s: read back %+v, %v", tc.json, back, err)
		}
	}
}
