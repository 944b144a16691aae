package image

import (
	"archive/tar"
	"bytes"
	"errors"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// treeImageLayers are the layers of the image whose flattened tree
// TestFlattenTree checks: every kind of entry, whiteouts, an opaque
// directory (marker after a new entry, to check order does not matter),
// hard links within and across layers, replacements.
func treeImageLayers(t testing.TB) [][]byte { return treeImageLayersSized(t, 100000) }

// treeImageLayersSized is treeImageLayers with big/a of size bytes.
func treeImageLayersSized(t testing.TB, size int) [][]byte {
	setuid := file("bin/su", "su")
	setuid.Mode, setuid.UID, setuid.GID = 0o4755, 1000, 2000
	xa := file("etc/cap", "cap")
	xa.Xattrs = map[string]string{"user.test": "hello", "trusted.evil": "x", "security.selinux": "label"}
	old := file("etc/old", "old")
	old.MTime = time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC)
	cdev := tarEntry{Name: "dev/null", Type: tar.TypeChar, Mode: 0o666, Dev: 1}
	fifo := tarEntry{Name: "run/fifo", Type: tar.TypeFifo, Mode: 0o640}
	ro := dir("ro", 0o555)
	ro.UID, ro.GID = 7, 8
	ro.MTime = time.Date(2010, 1, 1, 0, 0, 0, 0, time.UTC)
	l1 := tarBytes(t,
		dir("bin", 0o755), setuid,
		dir("etc", 0o755), file("etc/passwd", "root:x:0:0"), file("etc/hosts", "hosts-1"), xa, old,
		file("big/a", strings.Repeat("x", size)), hardlink("big/b", "big/a"),
		symlink("lnk", "etc/passwd"), symlink("abs", "/etc/passwd"), symlink("dangling", "../../nowhere"),
		dir("opq", 0o755), file("opq/old1", "1"), dir("opq/sub", 0o755), file("opq/sub/old2", "2"),
		file("gone", "bye"), dir("gonedir", 0o755), file("gonedir/x", "x"),
		dir("dev", 0o755), cdev, dir("run", 0o755), fifo,
		ro, file("ro/inside", "in"),
		file("becomes-dir", "f"),
		dir("d2f", 0o755), file("d2f/child", "c"),
	)
	l2 := tarBytes(t,
		file(".wh.gone", ""), file(".wh.gonedir", ""),
		dir("opq", 0o700), file("opq/new", "n"), file("opq/.wh..wh..opq", ""),
		file("etc/hosts", "hosts-2"),
		hardlink("etc/passwd-link", "etc/passwd"),
		file("etc/.wh.never-existed", ""),
		file("./dot/slash", "ok"),
	)
	l3 := tarBytes(t,
		dir("becomes-dir", 0o750), file("becomes-dir/f", "f"),
		file("d2f", "now a file"),
		file("big/a", "replaced"), // big/b keeps the old inode
	)
	return [][]byte{l1, l2, l3}
}

func TestFlattenTree(t *testing.T) {
	reg := newTestRegistry(t)
	ls := treeImageLayers(t)
	img := buildImage(t, "amd64", gzLayer(t, ls[0]), zstdLayer(t, ls[1]), gzLayer(t, ls[2]))
	ref := reg.push("tree:v1", img)
	c := newTestCache(t, Config{})
	im := mustGet(t, c, ref)
	defer im.Release()
	root := im.Root
	want, _ := img.Digest()
	if im.Digest != want.String() {
		t.Errorf("Digest = %s, want %s", im.Digest, want)
	}

	// The whole tree, as "path type" lines.
	var got []string
	filepath.Walk(root, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		rel, _ := filepath.Rel(root, p)
		got = append(got, rel+" "+fi.Mode().Type().String())
		return nil
	})
	sort.Strings(got)
	wantTree := []string{
		". d---------", "abs L---------", "becomes-dir d---------", "becomes-dir/f ----------",
		"big d---------", "big/a ----------", "big/b ----------", "bin d---------", "bin/su ----------",
		"d2f ----------", "dangling L---------", "dev d---------", "dot d---------", "dot/slash ----------",
		"etc d---------", "etc/cap ----------", "etc/hosts ----------", "etc/old ----------",
		"etc/passwd ----------", "etc/passwd-link ----------", "lnk L---------",
		"opq d---------", "opq/new ----------", "ro d---------", "ro/inside ----------",
		"run d---------", "run/fifo p---------",
	}
	if strings.Join(got, "\n") != strings.Join(wantTree, "\n") {
		t.Errorf("tree:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(wantTree, "\n"))
	}

	for p, body := range map[string]string{
		"etc/hosts": "hosts-2", "etc/passwd": "root:x:0:0", "etc/passwd-link": "root:x:0:0",
		"opq/new": "n", "big/a": "replaced", "big/b": strings.Repeat("x", 100000), "d2f": "now a file",
	} {
		if got := readFile(t, root, p); got != body {
			t.Errorf("%s = %.20q, want %.20q", p, got, body)
		}
	}
	for p, target := range map[string]string{"lnk": "etc/passwd", "abs": "/etc/passwd", "dangling": "../../nowhere"} {
		if got, err := os.Readlink(filepath.Join(root, p)); err != nil || got != target {
			t.Errorf("readlink %s = %q, %v; want %q", p, got, err, target)
		}
	}
	stat := func(p string) unix.Stat_t {
		var st unix.Stat_t
		if err := unix.Lstat(filepath.Join(root, p), &st); err != nil {
			t.Fatal(err)
		}
		return st
	}
	// Hard links are one inode; a replaced link name is a new one.
	if a, b := stat("etc/passwd"), stat("etc/passwd-link"); a.Ino != b.Ino || a.Nlink != 2 {
		t.Errorf("etc/passwd and etc/passwd-link: inodes %d %d nlink %d, want one inode, nlink 2", a.Ino, b.Ino, a.Nlink)
	}
	if a, b := stat("big/a"), stat("big/b"); a.Ino == b.Ino || b.Nlink != 1 {
		t.Errorf("big/a replaced: inodes %d %d, big/b nlink %d", a.Ino, b.Ino, b.Nlink)
	}
	// Ownership, set-id bits, modes, mtimes.
	if st := stat("bin/su"); st.Uid != 1000 || st.Gid != 2000 || st.Mode&0o7777 != 0o4755 {
		t.Errorf("bin/su: uid %d gid %d mode %o, want 1000 2000 4755", st.Uid, st.Gid, st.Mode&0o7777)
	}
	if st := stat("ro"); st.Uid != 7 || st.Gid != 8 || st.Mode&0o7777 != 0o555 {
		t.Errorf("ro: uid %d gid %d mode %o, want 7 8 555", st.Uid, st.Gid, st.Mode&0o7777)
	}
	if st := stat("ro"); time.Unix(st.Mtim.Unix()).UTC() != time.Date(2010, 1, 1, 0, 0, 0, 0, time.UTC) {
		t.Errorf("ro mtime %v, want 2010 (directory mtimes are set last)", time.Unix(st.Mtim.Unix()))
	}
	if st := stat("opq"); st.Mode&0o777 != 0o700 {
		t.Errorf("opq mode %o, want 700 (from the upper layer)", st.Mode&0o777)
	}
	if st := stat("etc/old"); time.Unix(st.Mtim.Unix()).UTC() != time.Date(2001, 1, 1, 0, 0, 0, 0, time.UTC) {
		t.Errorf("etc/old mtime %v, want 2001", time.Unix(st.Mtim.Unix()))
	}
	if st := stat("lnk"); time.Unix(st.Mtim.Unix()).UTC() != testTime {
		t.Errorf("lnk mtime %v, want %v", time.Unix(st.Mtim.Unix()), testTime)
	}
	if st := stat("run/fifo"); st.Mode&0o777 != 0o640 {
		t.Errorf("fifo mode %o, want 640", st.Mode&0o777)
	}
	// xattrs: user.* kept, trusted.* and security.selinux dropped.
	buf := make([]byte, 64)
	if n, err := unix.Lgetxattr(filepath.Join(root, "etc/cap"), "user.test", buf); err != nil || string(buf[:n]) != "hello" {
		t.Errorf("user.test = %q, %v; want hello", buf[:n], err)
	}
	if _, err := unix.Lgetxattr(filepath.Join(root, "etc/cap"), "trusted.evil", buf); err != unix.ENODATA {
		t.Errorf("trusted.evil: %v, want ENODATA", err)
	}
	if im.Size <= 100000 {
		t.Errorf("Size = %d, want > 100000", im.Size)
	}
	assertClean(t, c, 1)
}

// applyTars flattens the tar layers into a new directory under base.
func applyTars(t *testing.T, base string, layers ...[]byte) error {
	root := filepath.Join(base, "rootfs")
	if err := os.Mkdir(root, 0o755); err != nil {
		t.Fatal(err)
	}
	f, err := newFlattener(root, limits{})
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	for _, l := range layers {
		if err := f.ApplyLayer(bytes.NewReader(l)); err != nil {
			return err
		}
	}
	return f.Finish()
}

func TestFlattenUnsafe(t *testing.T) {
	outside := t.TempDir()
	os.WriteFile(filepath.Join(outside, "secret"), []byte("s"), 0o600)
	tests := []struct {
		name   string
		layers [][]byte
	}{
		{"dotdot", [][]byte{tarBytes(t, file("../escape", "x"))}},
		{"inner dotdot", [][]byte{tarBytes(t, dir("a", 0o755), file("a/../../escape", "x"))}},
		{"absolute", [][]byte{tarBytes(t, file("/etc/escape", "x"))}},
		{"through symlink", [][]byte{tarBytes(t, symlink("s", outside), file("s/pwned", "x"))}},
		{"through symlink next layer", [][]byte{tarBytes(t, symlink("s", outside)), tarBytes(t, file("s/pwned", "x"))}},
		{"through relative symlink", [][]byte{tarBytes(t, dir("a", 0o755), symlink("a/up", "../../.."), file("a/up/pwned", "x"))}},
		{"dir through symlink", [][]byte{tarBytes(t, symlink("s", outside), dir("s/d", 0o755))}},
		{"symlink through symlink", [][]byte{tarBytes(t, symlink("s", outside), symlink("s/l", "/"))}},
		{"hardlink out", [][]byte{tarBytes(t, hardlink("h", "../../../etc/passwd"))}},
		{"hardlink absolute", [][]byte{tarBytes(t, hardlink("h", "/etc/passwd"))}},
		{"hardlink via symlink", [][]byte{tarBytes(t, symlink("s", outside), hardlink("h", "s/secret"))}},
		{"hardlink missing", [][]byte{tarBytes(t, hardlink("h", "nothing"))}},
		{"hardlink dir", [][]byte{tarBytes(t, dir("d", 0o755), hardlink("h", "d"))}},
		{"whiteout through symlink", [][]byte{tarBytes(t, symlink("s", outside)), tarBytes(t, file("s/.wh.secret", ""))}},
		{"opaque through symlink", [][]byte{tarBytes(t, symlink("s", outside)), tarBytes(t, file("s/.wh..wh..opq", ""))}},
		{"whiteout dotdot", [][]byte{tarBytes(t, file(".wh...", ""))}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := applyTars(t, t.TempDir(), tc.layers...)
			if !errors.Is(err, ErrUnsafe) {
				t.Errorf("err = %v, want ErrUnsafe", err)
			}
			names, _ := os.ReadDir(outside)
			if len(names) != 1 || readFile(t, outside, "secret") != "s" {
				t.Errorf("outside directory touched: %v", names)
			}
		})
	}
}

// An image with an unsafe entry fails as a whole and leaves nothing.
func TestPullUnsafeImage(t *testing.T) {
	reg := newTestRegistry(t)
	img := buildImage(t, "amd64", gzLayer(t, tarBytes(t, file("ok", "1"))), gzLayer(t, tarBytes(t, file("../../evil", "x"))))
	ref := reg.push("unsafe:v1", img)
	c := newTestCache(t, Config{})
	_, err := get(t, c, ref, PullIfNotPresent, nil)
	if !errors.Is(err, ErrUnsafe) {
		t.Fatalf("err = %v, want ErrUnsafe", err)
	}
	if ResultOf(err) != ResultUnsafe {
		t.Errorf("ResultOf = %s", ResultOf(err))
	}
	assertClean(t, c, 0)
}

func TestFlattenCorruptTar(t *testing.T) {
	tb := tarBytes(t, file("a", strings.Repeat("y", 5000)))
	err := applyTars(t, t.TempDir(), tb[:700])
	if !errors.Is(err, ErrCorrupt) {
		t.Errorf("truncated tar: err = %v, want ErrCorrupt", err)
	}
}

func TestSubdir(t *testing.T) {
	base := t.TempDir()
	err := applyTars(t, base, tarBytes(t, dir("usr", 0o755), dir("usr/share", 0o755), file("usr/file", "f"),
		symlink("lnk", "usr"), symlink("abs", "/etc")))
	if err != nil {
		t.Fatal(err)
	}
	img := &Image{Root: filepath.Join(base, "rootfs"), Digest: "sha256:x"}
	for p, want := range map[string]string{"/": "", "": "", "usr": "usr", "/usr/share/": "usr/share", "./usr": "usr"} {
		got, err := img.Subdir(p)
		if err != nil || got != filepath.Join(img.Root, want) {
			t.Errorf("Subdir(%q) = %q, %v; want %q", p, got, err, filepath.Join(img.Root, want))
		}
	}
	for p, want := range map[string]error{"..": ErrInvalidArgument, "usr/../..": ErrInvalidArgument,
		"lnk": ErrNotFound, "abs": ErrNotFound, "lnk/share": ErrNotFound, "usr/file": ErrNotFound, "nope": ErrNotFound} {
		if _, err := img.Subdir(p); !errors.Is(err, want) {
			t.Errorf("Subdir(%q): err = %v, want %v", p, err, want)
		}
	}
}
