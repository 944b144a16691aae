package image

import (
	"archive/tar"
	"bytes"
	"crypto/sha256"
	"errors"
	"fmt"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// fuzzLimits keep one fuzz input's disk use small.
var fuzzLimits = limits{bytes: 1 << 20, bytesWhy: "the fuzz limit", files: 2000, pathLen: DefaultMaxPathLength}

// fuzzSeeds are layer stacks (up to three layers) of hostile and ordinary
// entries: the fixtures of the flattener tests and more.
func fuzzSeeds(t testing.TB) [][3][]byte {
	tb := func(es ...tarEntry) []byte { return tarBytes(t, es...) }
	raw := func(hdrs ...*tar.Header) []byte {
		var buf bytes.Buffer
		tw := tar.NewWriter(&buf)
		for _, h := range hdrs {
			if h.ModTime.IsZero() {
				h.ModTime = testTime
			}
			if err := tw.WriteHeader(h); err != nil {
				t.Fatal(err)
			}
			if h.Typeflag == tar.TypeReg {
				tw.Write(bytes.Repeat([]byte("b"), int(h.Size)))
			}
		}
		tw.Close()
		return buf.Bytes()
	}
	tree := treeImageLayersSized(t, 3000)
	long := strings.Repeat("n", 300)
	seeds := [][3][]byte{
		{tree[0], tree[1], tree[2]},
		{tb(file("../escape", "x"))},
		{tb(dir("a", 0o755), file("a/../../escape", "x"))},
		{tb(file("/etc/escape", "x"))},
		{tb(symlink("s", "../.."), file("s/pwned", "x"))},
		{tb(symlink("s", "..")), tb(file("s/pwned", "x"))},
		{tb(symlink("s", "/"), dir("s/d", 0o755))},
		{tb(symlink("s", "../secret"), symlink("s/l", "/"))},
		{tb(hardlink("h", "../secret"))},
		{tb(hardlink("h", "/etc/passwd"))},
		{tb(symlink("s", ".."), hardlink("h", "s/secret"))},
		{tb(hardlink("h", "nothing"))},
		{tb(dir("d", 0o755), hardlink("h", "d"))},
		{tb(symlink("s", "..")), tb(file("s/.wh.secret", ""))},
		{tb(symlink("s", "..")), tb(file("s/.wh..wh..opq", ""))},
		{tb(file(".wh...", ""))},
		{tb(file(".wh..", ""), file("a/.wh.", ""))},
		// Device nodes, FIFOs, duplicates, type confusion within and
		// across layers.
		{tb(tarEntry{Name: "dev/sda", Type: tar.TypeBlock, Mode: 0o600, Dev: 8}, tarEntry{Name: "null", Type: tar.TypeChar, Mode: 0o666, Dev: 1}, tarEntry{Name: "p", Type: tar.TypeFifo, Mode: 0o600})},
		{tb(file("x", "1"), file("x", "2"), dir("x", 0o755), symlink("x", "y"), hardlink("x", "x"))},
		{tb(dir("a", 0o755), file("a/f", "1")), tb(file("a", "now a file")), tb(dir("a/b", 0o755))},
		{tb(file("a", "f")), tb(symlink("a", "/")), tb(file("a/b", "x"))},
		{tb(symlink("a", "b"), dir("b", 0o755)), tb(hardlink("c", "a"), file("a/x", "x"))},
		{tb(file("f", "1"), hardlink("g", "f")), tb(file(".wh.f", "")), tb(file("g", "2"))},
		// Long names and targets, over NAME_MAX and the path limit.
		{tb(file(long, "x"))},
		{tb(file(strings.Repeat("d/", 2100)+"f", "x"))},
		{tb(symlink("l", strings.Repeat("t", 5000)))},
		// Huge and odd headers: a size past the limit, negative ids,
		// set-id bits, xattrs, PAX records, sparse and unknown types.
		{raw(&tar.Header{Name: "big", Typeflag: tar.TypeReg, Size: 2 << 20, Mode: 0o644})},
		{raw(&tar.Header{Name: "ids", Typeflag: tar.TypeReg, Size: 1, Mode: 0o7777, Uid: -5, Gid: 1 << 31, Format: tar.FormatPAX})},
		{raw(&tar.Header{Name: "xa", Typeflag: tar.TypeReg, Size: 1, Mode: 0o644, PAXRecords: map[string]string{
			"SCHILY.xattr.security.capability": "bad", "SCHILY.xattr.trusted.x": "t",
			"SCHILY.xattr.": "empty", "SCHILY.xattr.user.": "noname"}})},
		{raw(&tar.Header{Name: "u", Typeflag: 'Z', Mode: 0o644}, &tar.Header{Name: "c", Typeflag: tar.TypeCont, Mode: 0o644})},
		{raw(&tar.Header{Name: strings.Repeat("p/", 50) + long, Typeflag: tar.TypeDir, Mode: 0o755, Format: tar.FormatGNU})},
		// Truncated and corrupt tars.
		{tree[0][:700]},
		{bytes.Repeat([]byte{0xff}, 1024)},
	}
	return seeds
}

// FuzzFlatten flattens up to three hostile layers into a directory with
// files around it, and checks: no panic; nothing outside the tree
// changed; no device node in the tree; any error classified (ErrUnsafe,
// ErrCorrupt or ErrCacheFull).
func FuzzFlatten(f *testing.F) {
	for _, s := range fuzzSeeds(f) {
		f.Add(s[0], s[1], s[2])
	}
	f.Fuzz(func(t *testing.T, l1, l2, l3 []byte) {
		wd := time.AfterFunc(10*time.Second, func() {
			buf := make([]byte, 1<<20)
			n := runtime.Stack(buf, true)
			panic("FuzzFlatten: one input ran 10s:\n" + string(buf[:n]))
		})
		defer wd.Stop()
		base := t.TempDir()
		top := filepath.Join(base, "top")
		mid := filepath.Join(top, "mid")
		root := filepath.Join(mid, "rootfs")
		for _, d := range []string{top, mid, root} {
			if err := os.Mkdir(d, 0o755); err != nil {
				t.Fatal(err)
			}
		}
		for _, p := range []string{filepath.Join(top, "secret"), filepath.Join(mid, "secret")} {
			if err := os.WriteFile(p, []byte("s"), 0o600); err != nil {
				t.Fatal(err)
			}
		}
		before := snapshot(t, base, root)

		fl, err := newFlattener(root, fuzzLimits)
		if err != nil {
			t.Fatal(err)
		}
		for _, l := range [][]byte{l1, l2, l3} {
			if err = fl.ApplyLayer(bytes.NewReader(l)); err != nil {
				break
			}
		}
		if err == nil {
			err = fl.Finish()
		}
		fl.Close()
		if err != nil && !errors.Is(err, ErrUnsafe) && !errors.Is(err, ErrCorrupt) && !errors.Is(err, ErrCacheFull) {
			t.Errorf("unclassified error: %v", err)
		}
		if after := snapshot(t, base, root); after != before {
			t.Fatalf("outside the tree changed:\nbefore:\n%s\nafter:\n%s", before, after)
		}
		filepath.WalkDir(root, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return nil
			}
			if d.Type()&(fs.ModeDevice|fs.ModeCharDevice) != 0 {
				t.Errorf("device node %s in the tree", p)
			}
			return nil
		})
		// Leave the tree removable by the test's cleanup.
		os.RemoveAll(root)
	})
}

// snapshot describes everything under base except the tree at skip:
// names, types, modes, sizes, link counts, owners and contents.
func snapshot(t *testing.T, base, skip string) string {
	var b strings.Builder
	filepath.WalkDir(base, func(p string, d fs.DirEntry, err error) error {
		if err != nil {
			t.Fatal(err)
		}
		if p == skip {
			return filepath.SkipDir
		}
		var st unix.Stat_t
		if err := unix.Lstat(p, &st); err != nil {
			t.Fatal(err)
		}
		fmt.Fprintf(&b, "%s %o %d %d %d:%d", strings.TrimPrefix(p, base), st.Mode, st.Size, st.Nlink, st.Uid, st.Gid)
		if d.Type().IsRegular() {
			h := sha256.New()
			if fh, err := os.Open(p); err == nil {
				io.Copy(h, fh)
				fh.Close()
			}
			fmt.Fprintf(&b, " %x", h.Sum(nil)[:8])
		}
		b.WriteString("\n")
		return nil
	})
	return b.String()
}
