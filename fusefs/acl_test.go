package fusefs

import (
	"bytes"
	"encoding/binary"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/csi-memfs/csi-memfs/internal/acltest"
	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
)

// capXattr names a file's capabilities.
const capXattr = "security.capability"

// readACL returns the ACL attribute name of path, or nil if it has none.
func readACL(t *testing.T, path, name string) []byte {
	t.Helper()
	buf := make([]byte, 1024)
	n, err := unix.Getxattr(path, name, buf)
	if err == unix.ENODATA {
		return nil
	}
	if err != nil {
		t.Fatalf("getxattr %s %s: %v", path, name, err)
	}
	return buf[:n]
}

// wantACL checks the ACL attribute name of path.
func wantACL(t *testing.T, path, name string, want []byte) {
	t.Helper()
	if got := readACL(t, path, name); !bytes.Equal(got, want) {
		t.Errorf("%s of %s: %x, want %x", name, filepath.Base(path), got, want)
	}
}

// wantMode checks the permission bits of path.
func wantMode(t *testing.T, path string, want uint32) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatal(err)
	}
	if got := st.Mode & 07777; got != want {
		t.Errorf("mode of %s: %o, want %o", filepath.Base(path), got, want)
	}
}

// wantAccess checks what uid (with the same gid) gets reading path.
func wantAccess(t *testing.T, uid uint32, path string, want syscall.Errno) {
	t.Helper()
	if got := asCaller(t, uid, 0, "read", path); got != want {
		t.Errorf("uid %d reading %s: %v, want %v", uid, filepath.Base(path), got, want)
	}
}

// The ACLs of the tests: a file's that grants uid 1000 r-- (with the
// mask m and other's perms o), and a directory's default that grants uid
// 1000 rwx.
func fileACL(m, o uint16) []byte {
	return acltest.Encode(
		acltest.Entry{Tag: acltest.UserObj, Perm: 6},
		acltest.Entry{Tag: acltest.User, Perm: 4, ID: 1000},
		acltest.Entry{Tag: acltest.GroupObj},
		acltest.Entry{Tag: acltest.Mask, Perm: m},
		acltest.Entry{Tag: acltest.Other, Perm: o},
	)
}

func dirDefaultACL() []byte {
	return acltest.Encode(
		acltest.Entry{Tag: acltest.UserObj, Perm: 7},
		acltest.Entry{Tag: acltest.User, Perm: 7, ID: 1000},
		acltest.Entry{Tag: acltest.GroupObj, Perm: 5},
		acltest.Entry{Tag: acltest.Mask, Perm: 7},
		acltest.Entry{Tag: acltest.Other},
	)
}

// inheritedACL is what a new file of mode 0666 gets under dirDefaultACL:
// its entries, with the owner's, mask's and other's masked by the mode.
func inheritedACL(m uint16) []byte {
	return acltest.Encode(
		acltest.Entry{Tag: acltest.UserObj, Perm: 6},
		acltest.Entry{Tag: acltest.User, Perm: 7, ID: 1000},
		acltest.Entry{Tag: acltest.GroupObj, Perm: 5},
		acltest.Entry{Tag: acltest.Mask, Perm: m},
		acltest.Entry{Tag: acltest.Other},
	)
}

// checkInheritance creates a file and a directory in d, which has
// dirDefaultACL, with a umask that the default ACL overrides.
func checkInheritance(t *testing.T, d, file, sub string) {
	t.Helper()
	f, s := filepath.Join(d, file), filepath.Join(d, sub)
	if err := asCaller(t, 0, 077, "create", f); err != 0 {
		t.Fatalf("create %s: %v", file, err)
	}
	wantMode(t, f, 0o660)
	wantACL(t, f, aclAccess, inheritedACL(6))
	wantACL(t, f, aclDefault, nil)
	wantAccess(t, 1000, f, 0)
	wantAccess(t, 1001, f, syscall.EACCES)
	if err := asCaller(t, 0, 077, "mkdir", s); err != 0 {
		t.Fatalf("mkdir %s: %v", sub, err)
	}
	wantMode(t, s, 0o770)
	wantACL(t, s, aclDefault, dirDefaultACL())
	wantACL(t, s, aclAccess, dirDefaultACL())
}

// TestParityACLs: POSIX ACLs set, read back, enforced, inherited in place
// of the umask, and masked by chmod, as on tmpfs, and across a takeover.
func TestParityACLs(t *testing.T) {
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		f := filepath.Join(dir, "f")
		if err := os.WriteFile(f, []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		wantACL(t, f, aclAccess, nil)
		wantAccess(t, 1000, f, syscall.EACCES)
		if err := unix.Setxattr(f, aclAccess, fileACL(4, 0), 0); err != nil {
			t.Fatalf("setting an access ACL: %v", err)
		}
		wantACL(t, f, aclAccess, fileACL(4, 0))
		wantMode(t, f, 0o640) // the mask shows as the group bits
		wantAccess(t, 1000, f, 0)
		wantAccess(t, 1001, f, syscall.EACCES)
		if err := unix.Setxattr(f, aclAccess, []byte{2, 0, 0, 0, 1}, 0); err != unix.EINVAL {
			t.Errorf("a malformed ACL: %v, want EINVAL", err)
		}

		// Without a default ACL the umask applies.
		if err := asCaller(t, 0, 027, "create", filepath.Join(dir, "plain")); err != 0 {
			t.Fatalf("create: %v", err)
		}
		wantMode(t, filepath.Join(dir, "plain"), 0o640)
		if err := asCaller(t, 0, 027, "mkdir", filepath.Join(dir, "pd")); err != 0 {
			t.Fatalf("mkdir: %v", err)
		}
		wantMode(t, filepath.Join(dir, "pd"), 0o750)

		d := filepath.Join(dir, "d")
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := unix.Setxattr(d, aclDefault, dirDefaultACL(), 0); err != nil {
			t.Fatalf("setting a default ACL: %v", err)
		}
		wantMode(t, d, 0o755)
		checkInheritance(t, d, "f", "sub")

		// chmod sets the mask: uid 1000's r-- is masked off, and
		// others may read. (With a mask of ---, Linux would not look
		// at the ACL at all: others' bits would let uid 1000 read.)
		if err := os.Chmod(f, 0o614); err != nil {
			t.Fatal(err)
		}
		wantACL(t, f, aclAccess, fileACL(1, 4))
		wantAccess(t, 1000, f, syscall.EACCES)
		wantAccess(t, 1001, f, 0)

		v.takeover()
		wantACL(t, f, aclAccess, fileACL(1, 4))
		wantAccess(t, 1000, f, syscall.EACCES)
		wantAccess(t, 1001, f, 0)
		if err := os.Chmod(f, 0o640); err != nil {
			t.Fatal(err)
		}
		wantACL(t, f, aclAccess, fileACL(4, 0))
		wantAccess(t, 1000, f, 0)
		wantAccess(t, 1001, f, syscall.EACCES)
		wantACL(t, filepath.Join(d, "sub"), aclDefault, dirDefaultACL())
		checkInheritance(t, d, "g", "sub2")
		if err := unix.Removexattr(d, aclDefault); err != nil {
			t.Fatal(err)
		}
		if err := asCaller(t, 0, 027, "create", filepath.Join(d, "h")); err != 0 {
			t.Fatalf("create: %v", err)
		}
		wantMode(t, filepath.Join(d, "h"), 0o640)
		wantACL(t, filepath.Join(d, "h"), aclAccess, nil)
	})
}

// TestParityLowerACLs: ACLs of files and directories that were there
// before the mount (in an overlay's lower) are shown, enforced, inherited
// from, and kept by copy-up, as on tmpfs.
func TestParityLowerACLs(t *testing.T) {
	build := func(t *testing.T, dir string) {
		f, d := filepath.Join(dir, "f"), filepath.Join(dir, "d")
		if err := os.WriteFile(f, []byte("secret"), 0o600); err != nil {
			t.Fatal(err)
		}
		if err := unix.Setxattr(f, aclAccess, fileACL(4, 0), 0); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(d, "old"), nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := unix.Setxattr(d, aclDefault, dirDefaultACL(), 0); err != nil {
			t.Fatal(err)
		}
	}
	eachParityTree(t, build, func(t *testing.T, dir string, v *parityVolume) {
		f, d := filepath.Join(dir, "f"), filepath.Join(dir, "d")
		wantACL(t, f, aclAccess, fileACL(4, 0))
		wantMode(t, f, 0o640)
		wantACL(t, d, aclDefault, dirDefaultACL())
		buf := make([]byte, 256)
		if n, err := unix.Listxattr(f, buf); err != nil || string(buf[:n]) != aclAccess+"\x00" {
			t.Errorf("listxattr: %q, %v", buf[:n], err)
		}
		wantAccess(t, 1000, f, 0)
		wantAccess(t, 1001, f, syscall.EACCES)
		checkInheritance(t, d, "new", "sub")
		// A name that was removed is made again over its whiteout.
		if err := os.Remove(filepath.Join(d, "old")); err != nil {
			t.Fatal(err)
		}
		checkInheritance(t, d, "old", "old-dir")

		if err := os.Chmod(f, 0o614); err != nil { // copies f up
			t.Fatal(err)
		}
		wantACL(t, f, aclAccess, fileACL(1, 4))
		wantAccess(t, 1000, f, syscall.EACCES)
		wantAccess(t, 1001, f, 0)
		v.takeover()
		wantACL(t, f, aclAccess, fileACL(1, 4))
		wantAccess(t, 1000, f, syscall.EACCES)
		wantAccess(t, 1001, f, 0)
		wantACL(t, d, aclDefault, dirDefaultACL())
	})
}

// TestParityACLKillsSGID: setting a file's access ACL clears its
// set-group-ID bit when the caller is neither in the file's group nor
// privileged, and keeps it otherwise, as on tmpfs (xfstests generic/375),
// on files and directories, and across a takeover.
func TestParityACLKillsSGID(t *testing.T) {
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		f, d := filepath.Join(dir, "f"), filepath.Join(dir, "d")
		if err := os.WriteFile(f, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		check := func(when string) {
			for _, p := range []string{f, d} {
				for _, c := range []struct {
					gid  uint32
					want uint32
				}{
					{100, 0o2777}, // in the file's group: kept
					{101, 0o0777}, // not: cleared
				} {
					if err := os.Chown(p, 100, 100); err != nil {
						t.Fatal(err)
					}
					if err := unix.Chmod(p, 0o2755); err != nil {
						t.Fatal(err)
					}
					if err := asIDs(t, 100, c.gid, 0, "set-acl-rwx", p); err != 0 {
						t.Fatalf("%s: setfacl of %s as gid %d: %v", when, filepath.Base(p), c.gid, err)
					}
					var st unix.Stat_t
					if err := unix.Stat(p, &st); err != nil {
						t.Fatal(err)
					}
					if got := st.Mode & 0o7777; got != c.want {
						t.Errorf("%s: mode of %s after setfacl as gid %d: %o, want %o", when, filepath.Base(p), c.gid, got, c.want)
					}
				}
			}
		}
		check("")
		if v != nil {
			v.takeover()
			check("after a takeover")
		}
	})
}

// TestAdoptWithoutSetxattrExt: a successor serving a connection mounted
// without FUSE_SETXATTR_EXT (by a server older than it) parses SETXATTR
// as the kernel sends it, in the shorter form: xattrs and ACLs set after
// the takeover are stored under their names.
func TestAdoptWithoutSetxattrExt(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt, srv := mountUnmanaged(t, base, l, Options{disabledCaps: fuse.CAP_SETXATTR_EXT})
	srv2 := stopAndAdopt(t, mnt, srv, l)
	defer srv2.Unmount()
	f := filepath.Join(mnt, "f")
	if err := os.WriteFile(f, nil, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := unix.Setxattr(f, "user.name", []byte("value"), 0); err != nil {
		t.Fatalf("setxattr: %v", err)
	}
	buf := make([]byte, 64)
	if n, err := unix.Getxattr(f, "user.name", buf); err != nil || string(buf[:n]) != "value" {
		t.Errorf("getxattr: %q, %v; want \"value\"", buf[:max(n, 0)], err)
	}
	if err := unix.Setxattr(f, aclAccess, fileACL(4, 0), 0); err != nil {
		t.Fatalf("setting an ACL: %v", err)
	}
	wantACL(t, f, aclAccess, fileACL(4, 0))
}

// TestAdoptWithoutACLs: a successor serving a connection mounted without
// FUSE_POSIX_ACL (by a server older than ACLs) refuses them, as that
// server did: the kernel would not check access with them.
func TestAdoptWithoutACLs(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt, srv := mountUnmanaged(t, base, l, Options{})
	sess, err := srv.Stop()
	if err != nil {
		t.Fatal(err)
	}
	// The recorded reply's flags (fuse_out_header, then major, minor and
	// max_readahead), without FUSE_POSIX_ACL.
	flags := sess.Init[binary.LittleEndian.Uint32(sess.Init)+16+12:]
	binary.LittleEndian.PutUint32(flags, binary.LittleEndian.Uint32(flags)&^uint32(fuse.CAP_POSIX_ACL))
	srv2, err := Adopt(mnt, sess, adoptLayer(t, l), Options{}, false)
	if err != nil {
		t.Fatal(err)
	}
	defer srv2.Unmount()
	if err := unix.Setxattr(mnt, aclDefault, dirDefaultACL(), 0); err != unix.EOPNOTSUPP {
		t.Errorf("setting an ACL: %v, want EOPNOTSUPP", err)
	}
	if _, err := unix.Getxattr(mnt, aclAccess, nil); err != unix.EOPNOTSUPP {
		t.Errorf("reading an ACL: %v, want EOPNOTSUPP", err)
	}
}

// TestParityDefaultACLLearnt: what the memory layer remembers of a
// directory's default ACL (to spare a getxattr per create) follows every
// change: a default ACL set on a directory after creates in it, one
// removed, one inherited by a new subdirectory, and all of them across a
// takeover, after which the successor knows nothing and asks.
func TestParityDefaultACLLearnt(t *testing.T) {
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		d := filepath.Join(dir, "d")
		create := func(name string, umask, want uint32) {
			t.Helper()
			p := filepath.Join(d, name)
			if err := asCaller(t, 0, umask, "create", p); err != 0 {
				t.Fatalf("create %s: %v", name, err)
			}
			wantMode(t, p, want)
		}
		mkdir := func(name string, umask, want uint32) {
			t.Helper()
			p := filepath.Join(d, name)
			if err := asCaller(t, 0, umask, "mkdir", p); err != 0 {
				t.Fatalf("mkdir %s: %v", name, err)
			}
			wantMode(t, p, want)
		}
		if err := os.Mkdir(d, 0o755); err != nil {
			t.Fatal(err)
		}
		create("before", 027, 0o640) // no default ACL: the umask
		mkdir("early", 027, 0o750)
		if err := unix.Setxattr(d, aclDefault, dirDefaultACL(), 0); err != nil {
			t.Fatal(err)
		}
		create("after", 077, 0o660) // the default ACL, not the umask
		create("early/f", 027, 0o640)
		mkdir("sub", 077, 0o770)
		create("sub/f", 077, 0o660) // inherited with sub
		wantACL(t, filepath.Join(d, "sub/f"), aclAccess, inheritedACL(6))
		mkdir("sub/deeper", 077, 0o770)
		create("sub/deeper/f", 077, 0o660)
		if err := unix.Setxattr(filepath.Join(d, "early"), aclDefault, dirDefaultACL(), 0); err != nil {
			t.Fatal(err)
		}
		create("early/g", 077, 0o660)

		if err := unix.Removexattr(d, aclDefault); err != nil {
			t.Fatal(err)
		}
		create("removed", 027, 0o640)
		mkdir("plain", 027, 0o750)
		create("plain/f", 027, 0o640)
		create("sub/g", 077, 0o660) // sub keeps its own

		v.takeover()
		create("taken", 027, 0o640)
		create("sub/h", 077, 0o660)
		create("early/h", 077, 0o660)
		if err := unix.Setxattr(d, aclDefault, dirDefaultACL(), 0); err != nil {
			t.Fatal(err)
		}
		create("again", 077, 0o660)
		if err := unix.Removexattr(filepath.Join(d, "sub"), aclDefault); err != nil {
			t.Fatal(err)
		}
		create("sub/i", 027, 0o640)
	})
}

// TestParityCapabilitiesLearnt: a file's security.capability, which the
// memory layer remembers a file it made lacks (the kernel asks for it
// before every write and chown, to clear it), is seen once set, before
// and after a takeover, and cleared by a write and by removexattr, as on
// tmpfs.
func TestParityCapabilitiesLearnt(t *testing.T) {
	// VFS_CAP_REVISION_2, effective, permitted CAP_NET_BIND_SERVICE.
	caps := []byte{1, 0, 0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0}
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		f := filepath.Join(dir, "f")
		if err := os.WriteFile(f, []byte("x"), 0o755); err != nil {
			t.Fatal(err)
		}
		// An absent security.* attribute reads as EOPNOTSUPP through
		// the mount (see rawFS.GetXAttr), as ENODATA on tmpfs.
		wantCaps := func(want []byte) {
			t.Helper()
			buf := make([]byte, 64)
			n, err := unix.Getxattr(f, capXattr, buf)
			switch {
			case err == unix.ENODATA || err == unix.EOPNOTSUPP:
				n = 0
			case err != nil:
				t.Fatal(err)
			}
			if !bytes.Equal(buf[:n], want) {
				t.Errorf("%s: %x, want %x", capXattr, buf[:n], want)
			}
		}
		write := func() {
			t.Helper()
			w, err := os.OpenFile(f, os.O_WRONLY, 0)
			if err != nil {
				t.Fatal(err)
			}
			defer w.Close()
			if _, err := w.Write([]byte("y")); err != nil {
				t.Fatal(err)
			}
		}
		wantCaps(nil)
		write()
		if err := unix.Setxattr(f, capXattr, caps, 0); err != nil {
			t.Fatal(err)
		}
		wantCaps(caps)
		write()
		wantCaps(nil)
		if err := unix.Setxattr(f, capXattr, caps, 0); err != nil {
			t.Fatal(err)
		}
		v.takeover()
		wantCaps(caps)
		if err := unix.Removexattr(f, capXattr); err != nil {
			t.Fatal(err)
		}
		wantCaps(nil)
		if err := unix.Setxattr(f, capXattr, caps, 0); err != nil {
			t.Fatal(err)
		}
		wantCaps(caps)
		if err := os.Chown(f, 1000, 1000); err != nil {
			t.Fatal(err)
		}
		wantCaps(nil)
	})
}
