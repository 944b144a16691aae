package image

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"github.com/google/go-containerregistry/pkg/authn"
	"golang.org/x/sync/singleflight"
	"sigs.k8s.io/yaml"
)

// Credential provider plugins, as kubelet runs them
// (https://kubernetes.io/docs/tasks/administer-cluster/kubelet-credential-provider/).
//
// The config file is kubelet's --image-credential-provider-config: a
// CredentialProviderConfig (k8s.io/kubelet/config/v1) in YAML or JSON.
// A provider whose matchImages match the image is exec'd from the bin
// dir (kubelet's --image-credential-provider-bin-dir) with its args and
// env (added to the plugin's own environment), a CredentialProviderRequest
// (k8s.io/kubelet/pkg/apis/credentialprovider/v1) on stdin; it answers a
// CredentialProviderResponse on stdout. The answer is cached by its
// cacheKeyType (Image, Registry or Global) for its cacheDuration (the
// provider's defaultCacheDuration if unset; 0: not cached). A plugin runs
// for at most credentialProviderTimeout. A plugin that fails, times out
// or answers something malformed gives no credentials (the request goes
// on without, as kubelet's does) and is logged with the start of its
// stderr; nothing it printed reaches an error. Service account tokens
// (tokenAttributes) are not supported.
//
// The types below are the parts of those APIs this package uses, defined
// here to keep kubelet's packages out of the build.

// credentialProviderTimeout bounds one run of a plugin.
const credentialProviderTimeout = 30 * time.Second

// Bounds of what a plugin may print: its answer, and the start of its
// stderr that is logged.
const (
	maxProviderResponse = 1 << 20
	maxProviderStderr   = 1 << 10
	maxProviderConfig   = 1 << 20
)

// Accepted API versions: the config file's and the plugins'. The beta
// and alpha versions have the same fields as v1.
var (
	providerConfigAPIVersions = map[string]bool{
		"kubelet.config.k8s.io/v1": true, "kubelet.config.k8s.io/v1beta1": true, "kubelet.config.k8s.io/v1alpha1": true,
	}
	providerAPIVersions = map[string]bool{
		"credentialprovider.kubelet.k8s.io/v1": true, "credentialprovider.kubelet.k8s.io/v1beta1": true, "credentialprovider.kubelet.k8s.io/v1alpha1": true,
	}
)

// credentialProviderConfig is k8s.io/kubelet/config/v1
// CredentialProviderConfig.
type credentialProviderConfig struct {
	APIVersion string               `json:"apiVersion"`
	Kind       string               `json:"kind"`
	Providers  []credentialProvider `json:"providers"`
}

// credentialProvider is k8s.io/kubelet/config/v1 CredentialProvider.
type credentialProvider struct {
	Name                 string           `json:"name"`
	MatchImages          []string         `json:"matchImages"`
	DefaultCacheDuration *duration        `json:"defaultCacheDuration"`
	APIVersion           string           `json:"apiVersion"`
	Args                 []string         `json:"args,omitempty"`
	Env                  []execEnvVar     `json:"env,omitempty"`
	TokenAttributes      *json.RawMessage `json:"tokenAttributes,omitempty"`
}

// execEnvVar is k8s.io/kubelet/config/v1 ExecEnvVar.
type execEnvVar struct {
	Name  string `json:"name"`
	Value string `json:"value"`
}

// credentialProviderRequest is credentialprovider/v1
// CredentialProviderRequest (serviceAccountToken and annotations are
// not sent).
type credentialProviderRequest struct {
	APIVersion string `json:"apiVersion"`
	Kind       string `json:"kind"`
	Image      string `json:"image"`
}

// credentialProviderResponse is credentialprovider/v1
// CredentialProviderResponse.
type credentialProviderResponse struct {
	APIVersion    string                `json:"apiVersion"`
	Kind          string                `json:"kind"`
	CacheKeyType  string                `json:"cacheKeyType"`
	CacheDuration *duration             `json:"cacheDuration,omitempty"`
	Auth          map[string]authConfig `json:"auth,omitempty"`
}

// authConfig is credentialprovider/v1 AuthConfig.
type authConfig struct {
	Username string `json:"username"`
	Password string `json:"password"`
}

// duration is a metav1.Duration: a string time.ParseDuration reads.
type duration struct{ time.Duration }

func (d *duration) UnmarshalJSON(b []byte) error {
	var s string
	if err := json.Unmarshal(b, &s); err != nil {
		return errors.New("a duration is a string such as \"12h\"")
	}
	v, err := time.ParseDuration(s)
	if err != nil || v < 0 {
		return errors.New("not a duration such as \"12h\"")
	}
	d.Duration = v
	return nil
}

// parseCredentialProviderConfig parses and validates a
// CredentialProviderConfig in YAML or JSON. Errors name fields, never
// values (env values may be secret).
func parseCredentialProviderConfig(b []byte) (*credentialProviderConfig, error) {
	j, err := yaml.YAMLToJSON(b)
	if err != nil {
		return nil, fmt.Errorf("%w: credential provider config is not YAML or JSON", ErrInvalidArgument)
	}
	dec := json.NewDecoder(bytes.NewReader(j))
	dec.DisallowUnknownFields()
	var cfg credentialProviderConfig
	if err := dec.Decode(&cfg); err != nil {
		return nil, fmt.Errorf("%w: credential provider config: %s", ErrInvalidArgument, configErrorWhere(err))
	}
	if !providerConfigAPIVersions[cfg.APIVersion] || cfg.Kind != "CredentialProviderConfig" {
		return nil, fmt.Errorf("%w: credential provider config: want apiVersion kubelet.config.k8s.io/v1 and kind CredentialProviderConfig", ErrInvalidArgument)
	}
	if len(cfg.Providers) == 0 {
		return nil, fmt.Errorf("%w: credential provider config: no providers", ErrInvalidArgument)
	}
	seen := map[string]bool{}
	for i, p := range cfg.Providers {
		where := fmt.Sprintf("providers[%d]", i)
		switch {
		case p.Name == "" || p.Name == "." || p.Name == ".." || strings.ContainsAny(p.Name, "/\x00") || len(p.Name) > 255:
			return nil, fmt.Errorf("%w: credential provider config: %s.name must be a file name in the bin dir", ErrInvalidArgument, where)
		case seen[p.Name]:
			return nil, fmt.Errorf("%w: credential provider config: %s.name %q is given twice", ErrInvalidArgument, where, p.Name)
		case len(p.MatchImages) == 0:
			return nil, fmt.Errorf("%w: credential provider config: %s.matchImages is empty", ErrInvalidArgument, where)
		case p.DefaultCacheDuration == nil:
			return nil, fmt.Errorf("%w: credential provider config: %s.defaultCacheDuration is required", ErrInvalidArgument, where)
		case !providerAPIVersions[p.APIVersion]:
			return nil, fmt.Errorf("%w: credential provider config: %s.apiVersion: want credentialprovider.kubelet.k8s.io/v1", ErrInvalidArgument, where)
		case p.TokenAttributes != nil:
			return nil, fmt.Errorf("%w: credential provider config: %s.tokenAttributes: service account tokens are not supported for image volumes", ErrInvalidArgument, where)
		}
		seen[p.Name] = true
		for j, m := range p.MatchImages {
			if _, err := parseSchemeless(m); err != nil || m == "" {
				return nil, fmt.Errorf("%w: credential provider config: %s.matchImages[%d] is not an image pattern", ErrInvalidArgument, where, j)
			}
		}
		for j, e := range p.Env {
			if e.Name == "" || strings.ContainsAny(e.Name, "=\x00") || strings.ContainsRune(e.Value, 0) {
				return nil, fmt.Errorf("%w: credential provider config: %s.env[%d] is not NAME and value", ErrInvalidArgument, where, j)
			}
		}
	}
	return &cfg, nil
}

// configErrorWhere describes a decoding error of the config by field.
func configErrorWhere(err error) string {
	msg := jsonErrorWhere(err)
	if s := err.Error(); msg == "invalid JSON" && strings.HasPrefix(s, "json: unknown field ") {
		return "unknown field " + strings.TrimPrefix(s, "json: unknown field ")
	}
	return msg
}

// parseCredentialProviderResponse parses and validates a plugin's answer
// for a provider of apiVersion. Errors never quote it.
func parseCredentialProviderResponse(b []byte, apiVersion string) (*credentialProviderResponse, error) {
	var r credentialProviderResponse
	if err := json.Unmarshal(b, &r); err != nil {
		return nil, fmt.Errorf("response: %s", jsonErrorWhere(err))
	}
	if r.APIVersion != apiVersion || r.Kind != "CredentialProviderResponse" {
		return nil, fmt.Errorf("response: want apiVersion %s and kind CredentialProviderResponse", apiVersion)
	}
	switch r.CacheKeyType {
	case "Image", "Registry", "Global":
	default:
		return nil, errors.New("response: cacheKeyType must be Image, Registry or Global")
	}
	for k := range r.Auth {
		if host, _ := parseRegistryKey(k); host == "" {
			return nil, errors.New("response: an auth key names no registry")
		}
	}
	return &r, nil
}

// parseSchemeless parses an image or image pattern as kubelet does: as a
// URL, https:// added when it has no scheme.
func parseSchemeless(s string) (*url.URL, error) {
	if !strings.Contains(s, "://") {
		s = "https://" + s
	}
	u, err := url.Parse(s)
	if err != nil {
		return nil, err
	}
	if u.Host == "" {
		return nil, errors.New("no host")
	}
	return u, nil
}

// imageMatches reports whether image matches the pattern as kubelet's
// URLsMatch has it: the hosts have as many dot-separated parts, each
// part of the pattern matches its part by filepath.Match globbing ("*"
// within one part), the ports are equal, and the pattern's path is a
// prefix of the image's.
func imageMatches(pattern, image string) bool {
	pu, err := parseSchemeless(pattern)
	if err != nil {
		return false
	}
	iu, err := parseSchemeless(image)
	if err != nil {
		return false
	}
	if pu.Port() != iu.Port() {
		return false
	}
	pp, ip := strings.Split(pu.Hostname(), "."), strings.Split(iu.Hostname(), ".")
	if len(pp) != len(ip) {
		return false
	}
	for i := range pp {
		if ok, err := filepath.Match(pp[i], ip[i]); err != nil || !ok {
			return false
		}
	}
	return strings.HasPrefix(iu.Path, pu.Path)
}

// providerKeychains runs the plugins of a CredentialProviderConfig.
type providerKeychains struct {
	// providers, binDir, log and timeout are immutable.
	providers []credentialProvider
	binDir    string
	log       logr.Logger
	timeout   time.Duration
	// flights runs one plugin at a time per provider and image.
	flights singleflight.Group

	// mu protects cache.
	mu sync.Mutex
	// cache maps provider name, cache key type and key to an answer.
	cache map[providerCacheKey]providerCacheEntry
}

type providerCacheKey struct{ provider, keyType, key string }

type providerCacheEntry struct {
	creds   *secretKeychain
	expires time.Time
}

// newProviderKeychains reads the config file and checks the plugins are
// in binDir.
func newProviderKeychains(configFile, binDir string, log logr.Logger) (*providerKeychains, error) {
	if binDir == "" || !filepath.IsAbs(binDir) {
		return nil, fmt.Errorf("%w: credential provider bin dir %q must be an absolute path", ErrInvalidArgument, binDir)
	}
	f, err := os.Open(configFile)
	if err != nil {
		return nil, fmt.Errorf("%w: credential provider config: %w", ErrInvalidArgument, err)
	}
	defer f.Close()
	b, err := readAtMost(f, maxProviderConfig)
	if err != nil {
		return nil, fmt.Errorf("%w: credential provider config %s: %w", ErrInvalidArgument, configFile, err)
	}
	cfg, err := parseCredentialProviderConfig(b)
	if err != nil {
		return nil, err
	}
	for _, p := range cfg.Providers {
		if fi, err := os.Stat(filepath.Join(binDir, p.Name)); err != nil || !fi.Mode().IsRegular() {
			return nil, fmt.Errorf("%w: credential provider %q: no such plugin in %s", ErrInvalidArgument, p.Name, binDir)
		}
	}
	return &providerKeychains{providers: cfg.Providers, binDir: binDir, log: log, timeout: credentialProviderTimeout,
		cache: map[providerCacheKey]providerCacheEntry{}}, nil
}

// readAtMost reads f, failing past limit bytes.
func readAtMost(f io.Reader, limit int64) ([]byte, error) {
	b, err := io.ReadAll(io.LimitReader(f, limit+1))
	if err != nil {
		return nil, err
	}
	if int64(len(b)) > limit {
		return nil, fmt.Errorf("larger than %d bytes", limit)
	}
	return b, nil
}

// lookup implements credentialLookup: the first provider matching image
// whose answer has credentials for r.
func (pk *providerKeychains) lookup(image string, r authn.Resource) (authn.AuthConfig, bool) {
	for i := range pk.providers {
		p := &pk.providers[i]
		if !p.matches(image) {
			continue
		}
		creds := pk.credentials(p, image)
		if creds == nil {
			continue
		}
		if cfg, ok := creds.lookup(r); ok {
			return cfg, true
		}
	}
	return authn.AuthConfig{}, false
}

func (p *credentialProvider) matches(image string) bool {
	for _, m := range p.MatchImages {
		if imageMatches(m, image) {
			return true
		}
	}
	return false
}

// registryOf is the registry part of an image, the Registry cache key.
func registryOf(image string) string {
	u, err := parseSchemeless(image)
	if err != nil {
		return image
	}
	return u.Host
}

// credentials returns p's credentials for image, from the cache or a run
// of the plugin; nil if it has none.
func (pk *providerKeychains) credentials(p *credentialProvider, image string) *secretKeychain {
	now := time.Now()
	pk.mu.Lock()
	for _, k := range []providerCacheKey{{p.Name, "Global", ""}, {p.Name, "Registry", registryOf(image)}, {p.Name, "Image", image}} {
		if e, ok := pk.cache[k]; ok {
			if now.Before(e.expires) {
				pk.mu.Unlock()
				return e.creds
			}
			delete(pk.cache, k)
		}
	}
	pk.mu.Unlock()
	v, _, _ := pk.flights.Do(p.Name+"\x00"+image, func() (any, error) {
		return pk.run(p, image), nil
	})
	return v.(*secretKeychain)
}

// run execs p's plugin for image and caches its answer.
func (pk *providerKeychains) run(p *credentialProvider, image string) *secretKeychain {
	start := time.Now()
	resp, err := pk.exec(p, image)
	if err != nil {
		// Never a credential: err says how the plugin failed, stderr is
		// what it chose to print there.
		pk.log.Info("Credential provider failed; going on without its credentials", "provider", p.Name, "image", image, "err", err.err, "stderr", err.stderr, "duration", time.Since(start).Round(time.Millisecond))
		return nil
	}
	creds := &secretKeychain{}
	for k, a := range resp.Auth {
		host, path := parseRegistryKey(k)
		creds.creds = append(creds.creds, credential{host: host, path: path, auth: authn.AuthConfig{Username: a.Username, Password: a.Password}})
	}
	d := p.DefaultCacheDuration.Duration
	if resp.CacheDuration != nil {
		d = resp.CacheDuration.Duration
	}
	if d > 0 {
		key := providerCacheKey{p.Name, resp.CacheKeyType, ""}
		switch resp.CacheKeyType {
		case "Registry":
			key.key = registryOf(image)
		case "Image":
			key.key = image
		}
		now := time.Now()
		pk.mu.Lock()
		for k, e := range pk.cache {
			if !now.Before(e.expires) {
				delete(pk.cache, k)
			}
		}
		pk.cache[key] = providerCacheEntry{creds: creds, expires: now.Add(d)}
		pk.mu.Unlock()
	}
	return creds
}

// pluginError is a failed plugin run: what failed, and the start of its
// stderr, for the log only.
type pluginError struct {
	err    error
	stderr string
}

// exec runs p's plugin for image.
func (pk *providerKeychains) exec(p *credentialProvider, image string) (*credentialProviderResponse, *pluginError) {
	req, _ := json.Marshal(credentialProviderRequest{APIVersion: p.APIVersion, Kind: "CredentialProviderRequest", Image: image})
	ctx, cancel := context.WithTimeout(context.Background(), pk.timeout)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(pk.binDir, p.Name), p.Args...)
	cmd.Env = os.Environ()
	for _, e := range p.Env {
		cmd.Env = append(cmd.Env, e.Name+"="+e.Value)
	}
	cmd.Stdin = bytes.NewReader(req)
	stdout := &capWriter{max: maxProviderResponse}
	stderr := &capWriter{max: maxProviderStderr}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.WaitDelay = time.Second
	err := cmd.Run()
	switch {
	case ctx.Err() != nil:
		err = fmt.Errorf("timed out after %v", pk.timeout)
	case err != nil:
		var ee *exec.ExitError
		if !errors.As(err, &ee) {
			err = fmt.Errorf("cannot run the plugin: %w", err)
		}
	case stdout.over:
		err = fmt.Errorf("its answer is larger than %d bytes", maxProviderResponse)
	}
	if err != nil {
		return nil, &pluginError{err: err, stderr: stderr.String()}
	}
	resp, err := parseCredentialProviderResponse(stdout.buf.Bytes(), p.APIVersion)
	if err != nil {
		return nil, &pluginError{err: err, stderr: stderr.String()}
	}
	return resp, nil
}

// capWriter keeps the first max bytes written to it.
type capWriter struct {
	buf  bytes.Buffer
	max  int
	over bool
}

func (w *capWriter) Write(p []byte) (int, error) {
	if room := w.max - w.buf.Len(); room < len(p) {
		w.over = true
		w.buf.Write(p[:max(room, 0)])
	} else {
		w.buf.Write(p)
	}
	return len(p), nil
}

func (w *capWriter) String() string {
	s := strings.ToValidUTF8(w.buf.String(), "?")
	if w.over {
		s += "..."
	}
	return s
}
