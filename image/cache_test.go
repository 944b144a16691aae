package image

import (
	"context"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	v1 "github.com/google/go-containerregistry/pkg/v1"
	"github.com/google/go-containerregistry/pkg/v1/empty"
	"github.com/google/go-containerregistry/pkg/v1/layout"
	"github.com/google/go-containerregistry/pkg/v1/mutate"
	"github.com/google/go-containerregistry/pkg/v1/tarball"
)

// dockerConfigSecret is the CSI secrets map of a dockerconfigjson secret.
func dockerConfigSecret(host, user, pass string) map[string]string {
	auth := base64.StdEncoding.EncodeToString([]byte(user + ":" + pass))
	b, _ := json.Marshal(map[string]any{"auths": map[string]any{host: map[string]string{"auth": auth}}})
	return map[string]string{DockerConfigJSONKey: string(b)}
}

func TestAuth(t *testing.T) {
	reg := newTestRegistry(t)
	reg.user, reg.pass = "alice", "s3cret-Pa55"
	ref := reg.push("private:v1", simpleImage(t, map[string]string{"f": "private"}))
	c := newTestCache(t, Config{})

	// Anonymous, then wrong credentials: refused, secret never in the message.
	_, err := get(t, c, ref, PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("anonymous: err = %v, want ErrUnauthorized", err)
	}
	bad, err := KeychainFromSecrets(dockerConfigSecret(reg.host, "alice", "wrong-Pa55word"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = get(t, c, ref, PullIfNotPresent, bad)
	if !errors.Is(err, ErrUnauthorized) {
		t.Fatalf("wrong password: err = %v, want ErrUnauthorized", err)
	}
	t.Logf("wrong password: %v", err)
	if strings.Contains(err.Error(), "wrong-Pa55word") || strings.Contains(err.Error(), base64.StdEncoding.EncodeToString([]byte("alice:wrong-Pa55word"))) {
		t.Errorf("error message leaks the secret: %v", err)
	}
	good, err := KeychainFromSecrets(dockerConfigSecret("http://"+reg.host+"/v1/", "alice", "s3cret-Pa55"))
	if err != nil {
		t.Fatal(err)
	}
	im, err := get(t, c, ref, PullIfNotPresent, good)
	if err != nil {
		t.Fatalf("good credentials: %v", err)
	}
	if got := readFile(t, im.Root, "f"); got != "private" {
		t.Errorf("f = %q", got)
	}
	im.Release()

	// The cached private image is not handed to a caller without the
	// credentials: IfNotPresent asks the registry (refused), Never refuses
	// outright. The credentials that fetched it reuse it offline.
	if _, err := get(t, c, ref, PullIfNotPresent, nil); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("IfNotPresent without credentials on a cached private image: err = %v, want ErrUnauthorized", err)
	}
	if _, err := get(t, c, ref, PullNever, nil); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("Never without credentials on a cached private image: err = %v, want ErrUnauthorized", err)
	}
	if _, err := get(t, c, ref, PullNever, bad); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("Never with wrong credentials on a cached private image: err = %v, want ErrUnauthorized", err)
	}
	if im, err := get(t, c, ref, PullNever, good); err != nil {
		t.Errorf("Never with the credentials that fetched it: %v", err)
	} else {
		im.Release()
	}
	// Always re-checks access: the cached image is not handed out without it.
	if _, err := get(t, c, ref, PullAlways, bad); !errors.Is(err, ErrUnauthorized) {
		t.Errorf("Always with wrong credentials on a cached image: err = %v, want ErrUnauthorized", err)
	}
	st := c.Stats()
	if st.Pulls[ResultUnauthorized] != 4 || st.Pulls[ResultSuccess] != 1 {
		t.Errorf("Pulls = %v, want 4 unauthorized (anonymous, wrong, anonymous on the cached image, Always wrong), 1 success", st.Pulls)
	}
}

func TestNotFoundAndInvalid(t *testing.T) {
	reg := newTestRegistry(t)
	reg.push("app:v1", simpleImage(t, map[string]string{"f": "1"}))
	c := newTestCache(t, Config{})
	for _, ref := range []string{reg.host + "/app:missing", reg.host + "/nothing:v1",
		reg.host + "/app@sha256:" + strings.Repeat("ab", 32)} {
		if _, err := get(t, c, ref, PullIfNotPresent, nil); !errors.Is(err, ErrNotFound) {
			t.Errorf("%s: err = %v, want ErrNotFound", ref, err)
		}
	}
	if _, err := get(t, c, reg.host+"/app:v1", PullNever, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Never, not cached: err = %v, want ErrNotFound", err)
	}
	for _, ref := range []string{"", "UPPER/Case", "a:b:c", "app@sha256:short", "reg:5000/app:bad!tag"} {
		_, err := get(t, c, ref, PullIfNotPresent, nil)
		if !errors.Is(err, ErrInvalidReference) || !errors.Is(err, ErrInvalidArgument) {
			t.Errorf("%q: err = %v, want ErrInvalidReference", ref, err)
		}
	}
	if _, err := ParsePullPolicy("Sometimes"); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("ParsePullPolicy: err = %v", err)
	}
	assertClean(t, c, 0)
}

func TestUnavailable(t *testing.T) {
	l, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	addr := l.Addr().String()
	l.Close() // nothing listens there now
	c := newTestCache(t, Config{})
	_, err = get(t, c, addr+"/app:v1", PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Errorf("err = %v, want ErrUnavailable", err)
	}
}

func TestCorruptBlob(t *testing.T) {
	reg := newTestRegistry(t)
	img := buildImage(t, "amd64",
		gzLayer(t, tarBytes(t, file("a", "first"))),
		gzLayer(t, tarBytes(t, file("b", strings.Repeat("corrupt me ", 10000)))))
	ref := reg.push("bad:v1", img)
	ls, _ := img.Layers()
	d, _ := ls[1].Digest()
	reg.corrupt[d.String()] = true
	c := newTestCache(t, Config{})
	_, err := get(t, c, ref, PullIfNotPresent, nil)
	if !errors.Is(err, ErrCorrupt) {
		t.Fatalf("err = %v, want ErrCorrupt", err)
	}
	t.Logf("corrupt blob: %v", err)
	assertClean(t, c, 0)
	// Fixed on the server: the next Get pulls it whole.
	reg.mu.Lock()
	delete(reg.corrupt, d.String())
	reg.mu.Unlock()
	im := mustGet(t, c, ref)
	defer im.Release()
	if got := readFile(t, im.Root, "a"); got != "first" {
		t.Errorf("a = %q", got)
	}
	if st := c.Stats(); st.Pulls[ResultCorrupt] != 1 || st.Pulls[ResultSuccess] != 1 {
		t.Errorf("Pulls = %v", st.Pulls)
	}
}

func TestRegistryStoppedMidPull(t *testing.T) {
	reg := newTestRegistry(t)
	big := strings.Repeat("0123456789abcdef", 1<<16) // 1 MiB, compresses a little
	img := buildImage(t, "amd64", gzLayer(t, tarBytes(t, file("big", big))))
	ref := reg.push("dies:v1", img)
	ls, _ := img.Layers()
	d, _ := ls[0].Digest()
	reg.cut[d.String()] = true
	c := newTestCache(t, Config{})
	_, err := get(t, c, ref, PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	t.Logf("stopped mid-pull: %v", err)
	if reg.gets(d.String()) != 1 {
		t.Errorf("blob GETs = %d, want 1 (cut halfway)", reg.gets(d.String()))
	}
	assertClean(t, c, 0)
	// The registry is gone now: still Unavailable, still clean.
	if _, err := get(t, c, ref, PullIfNotPresent, nil); !errors.Is(err, ErrUnavailable) {
		t.Errorf("registry down: err = %v, want ErrUnavailable", err)
	}
	assertClean(t, c, 0)
}

func TestConcurrentGetsPullOnce(t *testing.T) {
	reg := newTestRegistry(t)
	img := buildImage(t, "amd64",
		gzLayer(t, tarBytes(t, file("a", strings.Repeat("a", 300000)))),
		gzLayer(t, tarBytes(t, file("b", "b"))))
	ref := reg.push("shared:v1", img)
	reg.slow, reg.chunk = 2*time.Millisecond, 4096 // long enough for all 20 to meet
	c := newTestCache(t, Config{})
	var wg sync.WaitGroup
	imgs := make([]*Image, 20)
	errs := make([]error, 20)
	for i := range imgs {
		wg.Add(1)
		go func() {
			defer wg.Done()
			imgs[i], errs[i] = get(t, c, ref, PullIfNotPresent, nil)
		}()
	}
	wg.Wait()
	for i, err := range errs {
		if err != nil {
			t.Fatalf("Get %d: %v", i, err)
		}
		if imgs[i].Root != imgs[0].Root {
			t.Errorf("Get %d: root %s, want %s", i, imgs[i].Root, imgs[0].Root)
		}
	}
	ls, _ := img.Layers()
	for i, l := range ls {
		d, _ := l.Digest()
		if n := reg.gets(d.String()); n != 1 {
			t.Errorf("layer %d fetched %d times, want 1", i, n)
		}
	}
	st := c.Stats()
	if st.Pulls[ResultSuccess] != 1 || st.Pinned != 1 || st.Images != 1 {
		t.Errorf("Stats = %+v, want 1 pull, 1 image pinned", st)
	}
	for _, im := range imgs {
		im.Release()
		im.Release() // idempotent
	}
	if st := c.Stats(); st.Pinned != 0 {
		t.Errorf("Pinned = %d after release", st.Pinned)
	}
}

// A Get that gives up (kubelet's deadline) leaves the pull running; the
// retry joins it.
func TestAbandonedGetPullContinues(t *testing.T) {
	reg := newTestRegistry(t)
	img := buildImage(t, "amd64", gzLayer(t, tarBytes(t, file("a", randString(200000)))))
	ref := reg.push("slow:v1", img)
	reg.slow, reg.chunk = 20*time.Millisecond, 2048
	var progress atomic.Int32
	c := newTestCache(t, Config{ProgressInterval: 100 * time.Millisecond, Progress: func(p Progress) {
		if p.Bytes > 0 && p.TotalBytes > 0 && p.Layers == 1 && p.Ref == ref {
			progress.Add(1)
		}
	}})
	ctx, cancel := context.WithTimeout(context.Background(), 150*time.Millisecond)
	_, err := c.Get(ctx, ref, PullIfNotPresent, nil)
	cancel()
	if !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("err = %v, want DeadlineExceeded", err)
	}
	if st := c.Stats(); st.InFlight != 1 {
		t.Errorf("InFlight = %d, want 1", st.InFlight)
	}
	im := mustGet(t, c, ref)
	defer im.Release()
	ls, _ := img.Layers()
	d, _ := ls[0].Digest()
	if n := reg.gets(d.String()); n != 1 {
		t.Errorf("layer fetched %d times, want 1", n)
	}
	if progress.Load() == 0 {
		t.Errorf("no progress reported for a slow pull")
	}
}

func TestPullPolicies(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("app:latest", simpleImage(t, map[string]string{"v": "1"}))
	c := newTestCache(t, Config{})
	im1 := mustGet(t, c, ref)
	im1.Release()
	reg.push("app:latest", simpleImage(t, map[string]string{"v": "2"}))

	im, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil || readFile(t, im.Root, "v") != "1" {
		t.Fatalf("IfNotPresent: %v, want the cached v1", err)
	}
	im.Release()
	before := reg.totalBlobGets()
	im, err = get(t, c, ref, PullNever, nil)
	if err != nil || readFile(t, im.Root, "v") != "1" || reg.totalBlobGets() != before {
		t.Fatalf("Never: %v", err)
	}
	im.Release()
	im, err = get(t, c, ref, PullAlways, nil)
	if err != nil || readFile(t, im.Root, "v") != "2" {
		t.Fatalf("Always: %v, want v2", err)
	}
	im.Release()
	// Always again: the digest is cached, no layer is fetched.
	before = reg.totalBlobGets()
	im, err = get(t, c, ref, PullAlways, nil)
	if err != nil || reg.totalBlobGets() != before {
		t.Fatalf("Always, unchanged: %v, %d blob GETs", err, reg.totalBlobGets()-before)
	}
	im.Release()
	// By digest, and the short Docker-style name of the same ref.
	byDigest := reg.host + "/app@" + im.Digest
	im, err = get(t, c, byDigest, PullNever, nil)
	if err != nil {
		t.Fatalf("Never by digest: %v", err)
	}
	im.Release()
	if st := c.Stats(); st.Images != 2 || st.Hits < 3 {
		t.Errorf("Stats = %+v", st)
	}
}

func TestPlatformIndex(t *testing.T) {
	reg := newTestRegistry(t)
	amd := simpleImage(t, map[string]string{"arch": "amd64"})
	arm := buildImage(t, "arm64", gzLayer(t, tarBytes(t, file("arch", "arm64"))))
	idx := mutate.AppendManifests(empty.Index,
		mutate.IndexAddendum{Add: arm, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "arm64"}}},
		mutate.IndexAddendum{Add: amd, Descriptor: v1.Descriptor{Platform: &v1.Platform{OS: "linux", Architecture: "amd64"}}},
	)
	ref := reg.pushIndex("multi:v1", idx)
	for _, arch := range []string{"amd64", "arm64"} {
		c := newTestCache(t, Config{Platform: "linux/" + arch})
		im := mustGet(t, c, ref)
		if got := readFile(t, im.Root, "arch"); got != arch {
			t.Errorf("platform %s: got the %s image", arch, got)
		}
		want, _ := map[string]v1.Image{"amd64": amd, "arm64": arm}[arch].Digest()
		if im.Digest != want.String() {
			t.Errorf("platform %s: digest %s, want the platform manifest's %s", arch, im.Digest, want)
		}
		im.Release()
		// By the index digest too.
		idxDigest, _ := idx.Digest()
		im, err := get(t, c, reg.host+"/multi@"+idxDigest.String(), PullIfNotPresent, nil)
		if err != nil || im.Digest != want.String() {
			t.Errorf("by index digest: %v", err)
		} else {
			im.Release()
		}
	}
	c := newTestCache(t, Config{Platform: "linux/s390x"})
	if _, err := get(t, c, ref, PullIfNotPresent, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("no matching platform: err = %v, want ErrNotFound", err)
	}
}

// Plain HTTP only to listed registries, and a registry named by a host
// that is not listed must not be at a loopback address: one dialled to our
// loopback server is refused unless listed.
func TestInsecureRegistries(t *testing.T) {
	reg := newTestRegistry(t)
	reg.push("app:v1", simpleImage(t, map[string]string{"f": "1"}))
	dialer := &net.Dialer{}
	tr := &http.Transport{DialContext: func(ctx context.Context, network, _ string) (net.Conn, error) {
		return dialer.DialContext(ctx, network, reg.host)
	}}
	ref := "registry.example.com:5000/app:v1"

	c := newTestCache(t, Config{Transport: tr})
	if _, err := get(t, c, ref, PullIfNotPresent, nil); !errors.Is(err, ErrRegistryNotAllowed) {
		t.Errorf("not listed: err = %v, want ErrRegistryNotAllowed", err)
	}
	c = newTestCache(t, Config{Transport: tr, InsecureRegistries: []string{"registry.example.com:5000"}})
	im, err := get(t, c, ref, PullIfNotPresent, nil)
	if err != nil {
		t.Fatalf("listed: %v", err)
	}
	im.Release()
	// The loopback registry itself, not listed.
	c = newTestCache(t, Config{InsecureRegistries: []string{}})
	if _, err := get(t, c, reg.host+"/app:v1", PullIfNotPresent, nil); !errors.Is(err, ErrRegistryNotAllowed) {
		t.Errorf("loopback, not listed: err = %v, want ErrRegistryNotAllowed", err)
	}

	p, err := newRegistryPolicy([]string{"allowed.example.com:443"}, []string{"reg.internal", "127.0.0.1:5000", "Docker.io"})
	if err != nil {
		t.Fatal(err)
	}
	for host, want := range map[string]bool{
		"127.0.0.1:5000": true, "127.0.0.1:5001": false, "127.9.9.9": false, "[::1]:80": false, "localhost:5000": false,
		"reg.internal:5000": true, "reg.internal": true, "REG.internal": true, "10.0.0.1:5000": false, "192.168.1.1": false,
		"localhost.evil.com": false, "example.com": false, "index.docker.io": true, "allowed.example.com:443": false,
	} {
		if got := p.isInsecure(host); got != want {
			t.Errorf("isInsecure(%s) = %v, want %v", host, got, want)
		}
	}
	for host, want := range map[string]bool{
		"127.0.0.1:5000": true, "127.0.0.1:5001": false, "127.9.9.9": false, "[::1]:80": false, "localhost:5000": false,
		"a.localhost:5000": false, "169.254.169.254": false, "[fe80::1]:5000": false, "0.0.0.0:80": false,
		"[::ffff:127.0.0.1]:80": false, "[fd00:ec2::254]": false, "10.0.0.1:5000": true, "8.8.8.8": true,
		"example.com": true, "allowed.example.com:443": true,
	} {
		if err := p.checkHost(host); (err == nil) != want || err != nil && !errors.Is(err, ErrRegistryNotAllowed) {
			t.Errorf("checkHost(%s) = %v, want allowed %v", host, err, want)
		}
	}
	if _, err := newRegistryPolicy([]string{"http://x/"}, nil); !errors.Is(err, ErrInvalidArgument) {
		t.Errorf("bad entry: err = %v, want ErrInvalidArgument", err)
	}
}

func TestGCUnderBudget(t *testing.T) {
	reg := newTestRegistry(t)
	payload := strings.Repeat("q", 200<<10) // each image ~200 KiB on disk
	refs := make([]string, 3)
	for i := range refs {
		refs[i] = reg.push(fmt.Sprintf("img%d:v1", i), simpleImage(t, map[string]string{"data": payload + fmt.Sprint(i)}))
	}
	c := newTestCache(t, Config{Budget: 500 << 10})
	a := mustGet(t, c, refs[0]) // pinned throughout
	b := mustGet(t, c, refs[1])
	b.Release()
	time.Sleep(10 * time.Millisecond)
	cc := mustGet(t, c, refs[2]) // over budget: b (unpinned, oldest) goes
	c.wg.Wait()
	if _, err := os.Stat(b.Root); !errors.Is(err, os.ErrNotExist) {
		t.Errorf("LRU unpinned image not collected: %v", err)
	}
	for _, im := range []*Image{a, cc} {
		if _, err := os.Stat(filepath.Join(im.Root, "data")); err != nil {
			t.Errorf("pinned image %s collected: %v", im.Ref, err)
		}
	}
	st := c.Stats()
	if st.Images != 2 || st.Evictions != 1 || st.Bytes > c.cfg.Budget {
		t.Errorf("Stats = %+v", st)
	}
	// A fourth image while both are pinned: over budget, nothing collectable.
	refs = append(refs, reg.push("img3:v1", simpleImage(t, map[string]string{"data": payload + "3"})))
	d := mustGet(t, c, refs[3])
	if st := c.Stats(); st.Images != 3 || st.Bytes <= c.cfg.Budget {
		t.Errorf("pinned images collected: %+v", st)
	}
	a.Release()
	cc.Release()
	d.Release()
	if n, _ := c.GC(); n != 0 {
		t.Errorf("GC collected %d, want 0 (already within budget)", n)
	}
	if st := c.Stats(); st.Bytes > c.cfg.Budget || st.Images != 2 {
		t.Errorf("after releases: %+v, want within budget", st)
	}
	// The collected ref is pulled again on demand.
	b = mustGet(t, c, refs[1])
	b.Release()
	// An image larger than the whole budget is refused up front.
	small := newTestCache(t, Config{Budget: 10})
	if _, err := get(t, small, refs[0], PullIfNotPresent, nil); !errors.Is(err, ErrCacheFull) {
		t.Errorf("too large: err = %v, want ErrCacheFull", err)
	}
}

func TestRestartWarmCache(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("warm:v1", simpleImage(t, map[string]string{"f": "warm"}))
	dir := t.TempDir()
	c1, err := NewCache(Config{Dir: dir, NoSync: true, InsecureRegistries: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	im := mustGet(t, c1, ref)
	digest, root := im.Digest, im.Root
	// A second process may not share the directory.
	if _, err := NewCache(Config{Dir: dir}); err == nil {
		t.Fatal("second cache on the same directory opened")
	}
	c1.Close()
	// Debris of a crash: a half-made pull and an image dir without meta.
	os.MkdirAll(filepath.Join(dir, "tmp", "pull-123", "rootfs", "x"), 0o755)
	os.MkdirAll(filepath.Join(dir, "images", "sha256-"+strings.Repeat("0", 64), "rootfs"), 0o755)

	// The registry is gone: only the cache can answer.
	reg.srv.CloseClientConnections()
	reg.srv.Close()
	c2 := newTestCache(t, Config{Dir: dir})
	assertClean(t, c2, 1)
	for _, p := range []PullPolicy{PullIfNotPresent, PullNever} {
		im, err := get(t, c2, ref, p, nil)
		if err != nil {
			t.Fatalf("%s after restart: %v", p, err)
		}
		if im.Root != root || readFile(t, im.Root, "f") != "warm" {
			t.Errorf("root %s, want %s", im.Root, root)
		}
		im.Release()
	}
	pinned, err := c2.Open(digest)
	if err != nil {
		t.Fatalf("Open: %v", err)
	}
	pinned.Release()
	if _, err := c2.Open("sha256:" + strings.Repeat("1", 64)); !errors.Is(err, ErrNotFound) {
		t.Errorf("Open missing: %v", err)
	}
	if _, err := get(t, c2, ref, PullAlways, nil); !errors.Is(err, ErrUnavailable) {
		t.Errorf("Always with the registry down: err = %v, want ErrUnavailable", err)
	}
}

func TestLocalImages(t *testing.T) {
	local := t.TempDir()
	img := simpleImage(t, map[string]string{"f": "from layout"})
	p, err := layout.Write(filepath.Join(local, "app"), empty.Index)
	if err != nil {
		t.Fatal(err)
	}
	if err := p.AppendImage(img, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v1"})); err != nil {
		t.Fatal(err)
	}
	img2 := simpleImage(t, map[string]string{"f": "from layout v2"})
	if err := p.AppendImage(img2, layout.WithAnnotations(map[string]string{"org.opencontainers.image.ref.name": "v2"})); err != nil {
		t.Fatal(err)
	}
	img3 := simpleImage(t, map[string]string{"f": "from tarball"})
	if err := os.MkdirAll(filepath.Join(local, "team"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := tarball.WriteToFile(filepath.Join(local, "team", "tool.tar"), nil, img3); err != nil {
		t.Fatal(err)
	}
	c := newTestCache(t, Config{LocalPrefix: "oci:", LocalDir: local})
	for ref, want := range map[string]string{"oci:app:v1": "from layout", "oci:app:v2": "from layout v2", "oci:team/tool": "from tarball"} {
		im, err := get(t, c, ref, PullIfNotPresent, nil)
		if err != nil {
			t.Fatalf("%s: %v", ref, err)
		}
		if got := readFile(t, im.Root, "f"); got != want {
			t.Errorf("%s: f = %q, want %q", ref, got, want)
		}
		im.Release()
	}
	d2, _ := img2.Digest()
	if im, err := get(t, c, "oci:app@"+d2.String(), PullAlways, nil); err != nil || im.Digest != d2.String() {
		t.Errorf("by digest: %v", err)
	}
	for ref, want := range map[string]error{
		"oci:app":             ErrInvalidReference, // two images: which?
		"oci:../etc":          ErrInvalidReference,
		"oci:/etc/passwd":     ErrInvalidReference,
		"oci:app/../../x":     ErrInvalidReference,
		"oci:.hidden":         ErrInvalidReference,
		"oci:missing":         ErrNotFound,
		"oci:app:v9":          ErrNotFound,
		"oci:team/tool:v1":    ErrInvalidReference,
		"oci:app@sha256:beef": ErrInvalidReference,
	} {
		if _, err := get(t, c, ref, PullIfNotPresent, nil); !errors.Is(err, want) {
			t.Errorf("%s: err = %v, want %v", ref, err, want)
		}
	}
	// A corrupted blob in the layout fails the pull.
	ls, _ := img.Layers()
	ld, _ := ls[0].Digest()
	blob := filepath.Join(local, "app", "blobs", ld.Algorithm, ld.Hex)
	b, _ := os.ReadFile(blob)
	b[len(b)/2] ^= 0xff
	os.WriteFile(blob, b, 0o644)
	c2 := newTestCache(t, Config{LocalPrefix: "oci:", LocalDir: local})
	if _, err := get(t, c2, "oci:app:v1", PullIfNotPresent, nil); !errors.Is(err, ErrCorrupt) {
		t.Errorf("corrupt layout blob: err = %v, want ErrCorrupt", err)
	}
	assertClean(t, c2, 0)
}

func TestStalledPull(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("stall:v1", buildImage(t, "amd64", gzLayer(t, tarBytes(t, file("a", randString(100000))))))
	reg.slow, reg.chunk = time.Minute, 1000 // one chunk, then silence
	c := newTestCache(t, Config{StallTimeout: 300 * time.Millisecond})
	start := time.Now()
	_, err := get(t, c, ref, PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnavailable) {
		t.Fatalf("err = %v, want ErrUnavailable", err)
	}
	if d := time.Since(start); d > 10*time.Second {
		t.Errorf("stall detected after %v", d)
	}
	assertClean(t, c, 0)
}

// Closing the cache mid-pull (the plugin stops) leaves nothing that a
// successor would use.
func TestCloseMidPull(t *testing.T) {
	reg := newTestRegistry(t)
	ref := reg.push("interrupted:v1", buildImage(t, "amd64", gzLayer(t, tarBytes(t, file("a", randString(100000))))))
	reg.slow, reg.chunk = 10*time.Millisecond, 1000
	dir := t.TempDir()
	c, err := NewCache(Config{Dir: dir, NoSync: true, InsecureRegistries: []string{"127.0.0.1"}})
	if err != nil {
		t.Fatal(err)
	}
	errc := make(chan error, 1)
	go func() {
		_, err := c.Get(context.Background(), ref, PullIfNotPresent, nil)
		errc <- err
	}()
	for c.Stats().InFlight == 0 {
		time.Sleep(time.Millisecond)
	}
	time.Sleep(50 * time.Millisecond)
	c.Close()
	if err := <-errc; !errors.Is(err, ErrClosed) {
		t.Errorf("err = %v, want ErrClosed", err)
	}
	reg.mu.Lock()
	reg.slow = 0
	reg.mu.Unlock()
	c2 := newTestCache(t, Config{Dir: dir})
	assertClean(t, c2, 0)
	if _, err := get(t, c2, ref, PullNever, nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("Never after an interrupted pull: err = %v, want ErrNotFound", err)
	}
	im := mustGet(t, c2, ref)
	im.Release()
}
