package volume

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// requireRoot skips tests that mount a memory layer unless we are root.
func requireRoot(t testing.TB) {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root (mounts tmpfs)")
	}
}

// TestSealAttribute seals files matching the seal globs, as publish does
// after an image lower layer is in place (a pure memory volume starts
// empty, so there the globs match nothing yet).
func TestSealAttribute(t *testing.T) {
	requireRoot(t)
	l, err := memfs.New(filepath.Join(t.TempDir(), "upper"), memfs.Options{Size: 1 << 20})
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	for _, p := range []string{"config/app.json", "config/sub/x.json", "config/readme", "bin/app", "app.json"} {
		os.MkdirAll(filepath.Join(l.Dir(), filepath.Dir(p)), 0o755)
		os.WriteFile(filepath.Join(l.Dir(), p), []byte("x"), 0o644)
	}
	v := &Volume{cfg: Config{Seal: []string{"config/*.json", "bin/app"}}, layer: l}
	if err := v.sealMatching(); err != nil {
		t.Fatal(err)
	}
	tree := v.tree()
	for p, want := range map[string]string{"config/app.json": "write,grow,shrink,seal", "bin/app": "write,grow,shrink,seal",
		"config/sub/x.json": "", "config/readme": "", "app.json": ""} {
		var ino uint64 = vfs.RootIno
		var refs []uint64
		for _, name := range strings.Split(p, "/") {
			e, err := tree.Lookup(ino, name)
			if err != nil {
				t.Fatalf("%s: %v", p, err)
			}
			ino = e.Ino()
			refs = append(refs, ino)
		}
		s, err := l.Seals(ino)
		if err != nil || s.String() != want {
			t.Errorf("%s: seals %q, %v; want %q", p, s, err, want)
		}
		for _, r := range refs {
			tree.Forget(r, 1)
		}
	}
	if err := l.CheckInvariants(); err != nil {
		t.Error(err)
	}
}
