package main

import (
	"bytes"
	"errors"
	"flag"
	"fmt"
	"io"
	"log"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-containerregistry/pkg/crane"
	"github.com/google/go-containerregistry/pkg/registry"
)

func TestMountFlags(t *testing.T) {
	empty := t.TempDir()
	full := t.TempDir()
	os.WriteFile(filepath.Join(full, "x"), nil, 0o644)
	file := filepath.Join(full, "x")
	for _, tc := range []struct {
		args    []string
		wantErr string
		size    int64
	}{
		{[]string{empty}, "", 64 << 20},
		{[]string{"--size", "1Gi", empty}, "", 1 << 30},
		{[]string{"--size=100M", "--inodes", "50", empty}, "", 100e6},
		{[]string{}, "want exactly one MOUNTPOINT", 0},
		{[]string{empty, empty}, "want exactly one MOUNTPOINT", 0},
		{[]string{"--size", "lots", empty}, "want a positive quantity", 0},
		{[]string{"--size", "-1Mi", empty}, "want a positive quantity", 0},
		{[]string{"--inodes", "-3", empty}, "invalid value", 0},
		{[]string{"--bogus", empty}, "flag provided but not defined", 0},
		{[]string{full}, "is not empty", 0},
		{[]string{file}, "not a directory", 0},
		{[]string{filepath.Join(empty, "missing")}, "no such file or directory", 0},
		{[]string{"--lower", full, empty}, "", 64 << 20},
		{[]string{"--lower", file, empty}, "is not a directory", 0},
		{[]string{"--lower", filepath.Join(full, "missing"), empty}, "no such file or directory", 0},
		{[]string{"--image", "busybox:1.36", "--insecure-registry", "10.0.0.1:5000", empty}, "", 64 << 20},
		{[]string{"--image", "busybox", "--lower", full, empty}, "exclusive", 0},
		{[]string{"--image", "busybox", "--image-pull-policy", "always", empty}, "want Always, IfNotPresent or Never", 0},
		{[]string{"--insecure-registry", "h:1", empty}, "need --image", 0},
		{[]string{"--image", "busybox", "--insecure-registry", "http://h/", empty}, "want HOST or HOST:PORT", 0},
		{[]string{"-o", "fsname=scratch,subtype=cache", "-o", "ro,allow_other,nosuid", empty}, "", 64 << 20},
		{[]string{"-o", "noatime", empty}, `"noatime": unknown option; accepted: fsname=NAME`, 0},
		{[]string{"-o", "max_read=4096", empty}, "unknown option", 0},
		{[]string{"-o", "fsname=", empty}, "want a non-empty name", 0},
		{[]string{"--fuse-transport", "ring", empty}, "want auto, io-uring or dev-fuse", 0},
		{[]string{"--kernel-cache", "--lower", full, empty}, "--kernel-cache needs a read-only mount (-o ro)", 0},
		{[]string{"--kernel-cache", "-o", "ro", "--lower", full, empty}, "", 64 << 20},
		{[]string{"-o", "subtype=a/b", empty}, "want letters, digits", 0},
	} {
		var out bytes.Buffer
		m, err := parseMountFlags(tc.args, &out)
		switch {
		case tc.wantErr == "" && err != nil:
			t.Errorf("%q: %v", tc.args, err)
		case tc.wantErr != "" && (err == nil || !strings.Contains(err.Error(), tc.wantErr)):
			t.Errorf("%q: error %v, want one containing %q", tc.args, err, tc.wantErr)
		case err != nil && strings.Contains(err.Error(), "\n"):
			t.Errorf("%q: error is not one line: %q", tc.args, err)
		case err != nil && out.Len() > 0:
			t.Errorf("%q: printed %q besides the error", tc.args, out.String())
		case err == nil && m.size.Value() != tc.size:
			t.Errorf("%q: size %d, want %d", tc.args, m.size.Value(), tc.size)
		}
	}
	var out bytes.Buffer
	if _, err := parseMountFlags([]string{"--help"}, &out); !errors.Is(err, flag.ErrHelp) || !strings.Contains(out.String(), "Usage: csi-memfs mount") {
		t.Errorf("--help: %v, printed %q", err, out.String())
	}
}

// TestMountCommand runs the built command: it mounts, serves, and on
// SIGTERM unmounts and exits 0; usage errors exit 2 with one line.
func TestMountCommand(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	bin := filepath.Join(t.TempDir(), "csi-memfs")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}

	var stderr bytes.Buffer
	cmd := exec.Command(bin, "mount", "--size", "lots", t.TempDir())
	cmd.Stderr = &stderr
	err := cmd.Run()
	var exit *exec.ExitError
	if !errors.As(err, &exit) || exit.ExitCode() != 2 || strings.Count(stderr.String(), "\n") != 1 {
		t.Errorf("bad flag: %v, stderr %q; want exit 2 and one line", err, stderr.String())
	}

	mnt := t.TempDir()
	state := t.TempDir()
	lower := t.TempDir()
	os.WriteFile(filepath.Join(lower, "from-lower"), []byte("lower data"), 0o644)
	cmd = exec.Command(bin, "mount", "--size", "8Mi", "--state-dir", state, "--lower", lower, "-o", "fsname=scratch-1,subtype=cache", mnt)
	stderr.Reset()
	cmd.Stderr = &stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Should the test fail midway, leave no process and no mount behind.
	t.Cleanup(func() {
		cmd.Process.Kill()
		for _, dir := range []string{mnt, state} {
			exec.Command("umount", "-R", "-l", dir).Run()
		}
		filepath.Walk(state, func(p string, fi os.FileInfo, err error) error {
			if err == nil && fi.IsDir() && fi.Name() == "upper" {
				exec.Command("umount", "-l", p).Run()
			}
			return nil
		})
	})
	deadline := time.Now().Add(10 * time.Second)
	for !mounted(mnt) && time.Now().Before(deadline) {
		time.Sleep(10 * time.Millisecond)
	}
	if !mounted(mnt) {
		cmd.Process.Kill()
		t.Fatalf("not mounted; stderr %q", stderr.String())
	}
	if source, fstype := mountSource(t, mnt); source != "scratch-1" || fstype != "fuse.cache" {
		t.Errorf("-o fsname=scratch-1,subtype=cache: mounted from %q as %q", source, fstype)
	}
	if err := os.WriteFile(filepath.Join(mnt, "f"), []byte("data"), 0o644); err != nil {
		t.Error(err)
	}
	if got, err := os.ReadFile(filepath.Join(mnt, "from-lower")); string(got) != "lower data" {
		t.Errorf("lower file through the mount: %q, %v", got, err)
	}
	if err := os.WriteFile(filepath.Join(mnt, "from-lower"), []byte("changed"), 0o644); err != nil {
		t.Error(err)
	}
	if got, _ := os.ReadFile(filepath.Join(lower, "from-lower")); string(got) != "lower data" {
		t.Errorf("the lower directory changed: %q", got)
	}
	checkCachedDescriptors(t, cmd.Process.Pid, mnt)
	cmd.Process.Signal(syscall.SIGTERM)
	if err := cmd.Wait(); err != nil {
		t.Errorf("exit after SIGTERM: %v; stderr %q", err, stderr.String())
	}
	if mounted(mnt) {
		t.Error("still mounted after SIGTERM")
	}
	if entries, _ := os.ReadDir(state); len(entries) != 0 {
		t.Errorf("state dir left behind: %v", entries)
	}
}

// checkCachedDescriptors creates and stats 1500 files on the mount of
// the csi-memfs process pid and checks that it keeps a descriptor of each
// (the plugin's budget, half the open-file limit; it kept 1024, past which
// every request on an inode opened and closed one).
func checkCachedDescriptors(t *testing.T, pid int, mnt string) {
	t.Helper()
	const files = 1500
	var rl syscall.Rlimit
	if err := syscall.Getrlimit(syscall.RLIMIT_NOFILE, &rl); err != nil || rl.Max/2 < files+100 {
		t.Logf("open-file limit %d (%v): too low to check %d cached descriptors", rl.Max, err, files)
		return
	}
	dir := filepath.Join(mnt, "many")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range files {
		p := filepath.Join(dir, fmt.Sprint(i))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if _, err := os.Stat(p); err != nil {
			t.Fatal(err)
		}
	}
	fds, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	cached := 0
	for _, fd := range fds {
		if target, err := os.Readlink(fmt.Sprintf("/proc/%d/fd/%s", pid, fd.Name())); err == nil && strings.Contains(target, "/upper/many/") {
			cached++
		}
	}
	if cached < files {
		t.Errorf("the daemon holds %d descriptors of the %d files the kernel holds; want one each", cached, files)
	}
}

// mountSource returns the source and type /proc/self/mountinfo gives the
// mount on dir.
func mountSource(t *testing.T, dir string) (source, fstype string) {
	t.Helper()
	data, err := os.ReadFile("/proc/self/mountinfo")
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(data), "\n") {
		// ID PARENT MAJ:MIN ROOT MOUNTPOINT OPTIONS [OPTIONAL...] - TYPE SOURCE SUPER
		pre, post, ok := strings.Cut(line, " - ")
		f, g := strings.Fields(pre), strings.Fields(post)
		if ok && len(f) >= 5 && f[4] == dir && len(g) >= 2 {
			source, fstype = g[1], g[0]
		}
	}
	return source, fstype
}

func mounted(dir string) bool {
	data, _ := os.ReadFile("/proc/self/mounts")
	return strings.Contains(string(data), " "+dir+" ")
}

// TestMountImage runs `csi-memfs mount --image` against a registry on
// loopback: the image's files show, writes stay in memory, the cached
// tree is untouched, and a second mount uses the cache without the
// registry.
func TestMountImage(t *testing.T) {
	if os.Geteuid() != 0 {
		t.Skip("needs root")
	}
	bin := filepath.Join(t.TempDir(), "csi-memfs")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	srv := httptest.NewServer(registry.New(registry.Logger(log.New(io.Discard, "", 0))))
	defer srv.Close()
	img, err := crane.Image(map[string][]byte{"etc/greeting": []byte("hello from the image"), "bin/app": []byte("app")})
	if err != nil {
		t.Fatal(err)
	}
	ref := strings.TrimPrefix(srv.URL, "http://") + "/demo:v1"
	if err := crane.Push(img, ref); err != nil {
		t.Fatal(err)
	}
	cacheDir := t.TempDir()
	run := func(extra ...string) {
		t.Helper()
		mnt := t.TempDir()
		var stderr bytes.Buffer
		cmd := exec.Command(bin, append(append([]string{"mount", "--size", "8Mi", "--state-dir", t.TempDir(),
			"--image-cache-dir", cacheDir, "--insecure-registry", "127.0.0.1"}, extra...), mnt)...)
		cmd.Stderr = &stderr
		if err := cmd.Start(); err != nil {
			t.Fatal(err)
		}
		deadline := time.Now().Add(30 * time.Second)
		for !mounted(mnt) && time.Now().Before(deadline) && cmd.ProcessState == nil {
			time.Sleep(10 * time.Millisecond)
		}
		if !mounted(mnt) {
			cmd.Process.Kill()
			cmd.Wait()
			t.Fatalf("not mounted; stderr %q", stderr.String())
		}
		if got, err := os.ReadFile(filepath.Join(mnt, "etc/greeting")); string(got) != "hello from the image" {
			t.Errorf("etc/greeting: %q, %v", got, err)
		}
		if err := os.WriteFile(filepath.Join(mnt, "etc/greeting"), []byte("changed"), 0o644); err != nil {
			t.Error(err)
		}
		cmd.Process.Signal(syscall.SIGTERM)
		if err := cmd.Wait(); err != nil {
			t.Errorf("exit after SIGTERM: %v; stderr %q", err, stderr.String())
		}
		if mounted(mnt) {
			t.Error("still mounted after SIGTERM")
		}
	}
	run("--image", ref)
	srv.Close()
	// From the cache: no registry needed, and the first mount's write is gone.
	run("--image", ref, "--image-pull-policy", "Never")
	trees, _ := filepath.Glob(filepath.Join(cacheDir, "images", "*", "rootfs", "etc", "greeting"))
	if len(trees) != 1 {
		t.Fatalf("%d cached trees", len(trees))
	}
	if got, _ := os.ReadFile(trees[0]); string(got) != "hello from the image" {
		t.Errorf("cached etc/greeting = %q", got)
	}
}
