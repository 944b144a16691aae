package fusefs

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/overlay"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// The tmpfs-parity tests: each runs the same steps on kernel tmpfs (the
// oracle) and through real mounts of every kind of volume, passthrough on
// and off, and where state is involved across a takeover.

// parityKind is a kind of volume the parity tests run on.
type parityKind struct {
	name    string
	overlay bool
	opts    Options
}

var parityKinds = []parityKind{
	{"memfs-passthrough", false, Options{}},
	{"memfs-daemon-io", false, Options{DisablePassthrough: true}},
	{"overlay-passthrough", true, Options{}},
	{"overlay-daemon-io", true, Options{DisablePassthrough: true}},
}

// parityVolume is a mounted volume of a parityKind, which a test can have
// a successor server take over.
type parityVolume struct {
	t    *testing.T
	kind parityKind
	// mnt is the mountpoint; dir is where a test works in it (the
	// overlay's lower tree is beside it).
	mnt, dir string
	l        *memfs.Layer
	lower    string
	srv      *Server
	// ops counts the requests served, by every server of the volume.
	ops *opCounter
}

// eachParity runs fn on tmpfs (v is nil) and on every kind of volume.
// dir is an empty directory to work in.
func eachParity(t *testing.T, fn func(t *testing.T, dir string, v *parityVolume)) {
	eachParityTree(t, nil, fn)
}

// eachParityTree is eachParity with the directory fn works in filled by
// build first: on an overlay, build fills it in the lower (a tmpfs, so
// that its files can carry ACLs) before the mount; elsewhere, in place.
func eachParityTree(t *testing.T, build func(t *testing.T, dir string), fn func(t *testing.T, dir string, v *parityVolume)) {
	t.Run("tmpfs", func(t *testing.T) {
		_, l := newTestLayer(t, 64<<20)
		dir := filepath.Join(l.Dir(), "t")
		if err := os.Mkdir(dir, 0o755); err != nil {
			t.Fatal(err)
		}
		if build != nil {
			build(t, dir)
		}
		fn(t, dir, nil)
	})
	for _, k := range parityKinds {
		t.Run(k.name, func(t *testing.T) {
			v := newParityVolume(t, k, build)
			fn(t, v.dir, v)
		})
	}
}

func newParityVolume(t *testing.T, k parityKind, build func(t *testing.T, dir string)) *parityVolume {
	base, l := newTestLayer(t, 64<<20)
	v := &parityVolume{t: t, kind: k, mnt: filepath.Join(base, "mnt"), l: l, ops: &opCounter{ops: map[string]int{}}}
	v.kind.opts.Observer = v.ops
	switch {
	case k.overlay && build != nil:
		_, ll := newTestLayer(t, 16<<20)
		v.lower = ll.Dir()
		if err := os.Mkdir(filepath.Join(v.lower, "t"), 0o755); err != nil {
			t.Fatal(err)
		}
		build(t, filepath.Join(v.lower, "t"))
	case k.overlay:
		v.lower = makeOverlayLower(t)
	}
	if err := os.Mkdir(v.mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	srv, err := Mount(v.mnt, v.tree(l), v.kind.opts)
	if err != nil {
		t.Fatal(err)
	}
	v.srv = srv
	t.Cleanup(func() {
		if err := v.srv.Unmount(); err != nil {
			t.Errorf("unmount: %v", err)
		}
	})
	v.dir = v.mnt
	if k.overlay {
		v.dir = filepath.Join(v.mnt, "t")
	} else if err := os.Mkdir(filepath.Join(v.mnt, "t"), 0o755); err != nil {
		t.Fatal(err)
	} else {
		v.dir = filepath.Join(v.mnt, "t")
	}
	if build != nil && !k.overlay {
		build(t, v.dir)
	}
	return v
}

// tree returns the volume's tree over l, as the volume builder makes it.
func (v *parityVolume) tree(l *memfs.Layer) vfs.FS {
	if !v.kind.overlay {
		return l
	}
	dl, err := overlay.NewDirLower(v.lower)
	if err != nil {
		v.t.Fatal(err)
	}
	fs, err := overlay.New(l, dl)
	if err != nil {
		v.t.Fatal(err)
	}
	v.t.Cleanup(func() { fs.Close(); dl.Close() })
	return fs
}

// takeover has a successor server, over a layer opened again, take over
// the volume's connection, as after a plugin upgrade. On tmpfs (v nil) it
// does nothing.
func (v *parityVolume) takeover() {
	if v == nil {
		return
	}
	v.t.Helper()
	sess, err := v.srv.Stop()
	if err != nil {
		v.t.Fatal(err)
	}
	v.l.Detach()
	l2 := adoptLayer(v.t, v.l)
	srv, err := Adopt(v.mnt, sess, v.tree(l2), v.kind.opts, false)
	if err != nil {
		v.t.Fatal(err)
	}
	v.srv = srv
}
