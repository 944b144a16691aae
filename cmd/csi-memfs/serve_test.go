package main

import (
	"io"
	"strings"
	"testing"
)

func TestParseServeFlags(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	cfg, err := parseServeFlags([]string{"--node-id", "n1", "--node-memory-budget", "8Gi", "--default-volume-size", "32Mi",
		"--max-volumes", "100", "--endpoint", "unix:///tmp/x.sock"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeID != "n1" || cfg.NodeBudget != 8<<30 || cfg.DefaultVolumeSize != 32<<20 || cfg.MaxVolumes != 100 ||
		cfg.Endpoint != "unix:///tmp/x.sock" || cfg.StateDir != "/var/lib/csi-memfs" || cfg.MetricsAddress != ":9809" ||
		cfg.DriverName != "memfs.csi.dev" || cfg.MaxVolumeSize != 0 || cfg.KubeletDir != "/var/lib/kubelet" ||
		cfg.MaxVolumeInodes != 1_000_000 {
		t.Errorf("cfg = %+v", cfg)
	}
	cfg, err = parseServeFlags([]string{"--node-id", "n1", "--image-cache-dir", "/var/cache/img", "--image-cache-budget", "20Gi",
		"--insecure-registry", "10.0.0.1:5000", "--insecure-registry", "reg.local", "--local-images", "/var/lib/images",
		"--allow-registry", "ghcr.io", "--registry-ca-file", "/etc/ca/bundle.pem", "--image-max-files", "1000",
		"--image-max-path-length", "512", "--image-disk-reserve", "2Gi"}, io.Discard)
	if err != nil || cfg.ImageCacheDir != "/var/cache/img" || cfg.ImageCacheBudget != 20<<30 || cfg.LocalImagesDir != "/var/lib/images" ||
		strings.Join(cfg.InsecureRegistries, ",") != "10.0.0.1:5000,reg.local" || strings.Join(cfg.AllowedRegistries, ",") != "ghcr.io" ||
		cfg.RegistryCAFile != "/etc/ca/bundle.pem" || cfg.ImageMaxFiles != 1000 || cfg.ImageMaxPathLength != 512 || cfg.ImageDiskReserve != 2<<30 {
		t.Errorf("image flags: %+v, %v", cfg, err)
	}
	t.Setenv("NODE_NAME", "from-env")
	if cfg, err := parseServeFlags(nil, io.Discard); err != nil || cfg.NodeID != "from-env" || cfg.DefaultVolumeSize != 64<<20 {
		t.Errorf("defaults: %+v, %v", cfg, err)
	}
	t.Setenv("NODE_NAME", "")
	for _, args := range [][]string{
		{}, // no node id
		{"--node-id", "n", "--node-memory-budget", "lots"}, // not a quantity
		{"--node-id", "n", "extra"},
		{"--node-id", "n", "--insecure-registry", "http://x/"},
		{"--node-id", "n", "--allow-registry", ""},
		{"--node-id", "n", "--image-cache-budget", "-1Gi"},
	} {
		if _, err := parseServeFlags(args, io.Discard); err == nil {
			t.Errorf("%s: no error", strings.Join(args, " "))
		}
	}
}

func TestVersion(t *testing.T) {
	old := buildVersion
	buildVersion = "9.8.7"
	defer func() { buildVersion = old }()
	for _, arg := range []string{"--version", "version"} {
		if code := run([]string{arg}, io.Discard); code != 0 {
			t.Errorf("csi-memfs %s: exit %d, want 0", arg, code)
		}
	}
	if got := versionString(); got != "9.8.7" {
		t.Errorf("versionString() = %q, want the build's version", got)
	}
}

func TestParseRegistryAccessFlags(t *testing.T) {
	cfg, err := parseServeFlags([]string{"--node-id", "n1",
		"--node-docker-config", "/var/lib/kubelet/config.json", "--node-docker-config", "/root/.docker/config.json",
		"--image-credential-provider-config", "/etc/kubernetes/credential-provider.yaml",
		"--image-credential-provider-bin-dir", "/usr/libexec/kubernetes/credential-providers",
		"--registry-mirror", "docker.io=mirror.example.com:5000", "--registry-mirror", "docker.io=mirror2.example.com",
		"--registry-mirror", "ghcr.io=ghcr-mirror.example.com"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if strings.Join(cfg.NodeDockerConfigs, ",") != "/var/lib/kubelet/config.json,/root/.docker/config.json" ||
		cfg.CredentialProviderConfig != "/etc/kubernetes/credential-provider.yaml" ||
		cfg.CredentialProviderBinDir != "/usr/libexec/kubernetes/credential-providers" ||
		strings.Join(cfg.RegistryMirrors["docker.io"], ",") != "mirror.example.com:5000,mirror2.example.com" ||
		strings.Join(cfg.RegistryMirrors["ghcr.io"], ",") != "ghcr-mirror.example.com" || len(cfg.RegistryMirrors) != 2 {
		t.Errorf("cfg = %+v", cfg)
	}
	for _, args := range [][]string{
		{"--node-docker-config", "config.json"},
		{"--registry-mirror", "docker.io"},
		{"--registry-mirror", "=mirror"},
		{"--registry-mirror", "docker.io=http://mirror/"},
	} {
		if _, err := parseServeFlags(append([]string{"--node-id", "n"}, args...), io.Discard); err == nil {
			t.Errorf("%s: no error", strings.Join(args, " "))
		}
	}
}
