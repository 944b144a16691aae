package memfs

import (
	"encoding/binary"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/internal/acltest"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// aclPerm returns the permissions of the first entry tagged tag in the
// encoded ACL b, or -1.
func aclPerm(b []byte, tag uint16) int {
	for b = b[4:]; len(b) >= 8; b = b[8:] {
		if binary.LittleEndian.Uint16(b) == tag {
			return int(binary.LittleEndian.Uint16(b[2:]))
		}
	}
	return -1
}

// TestACLs: ACLs are stored, set the mode, are inherited from a default
// ACL in place of the caller's umask, and chmod updates their mask.
func TestACLs(t *testing.T) {
	l := newLayer(t, 1<<20)
	c := vfs.Caller{Uid: 1000, Gid: 1000, Umask: 022}
	acl := acltest.Encode(
		acltest.Entry{Tag: acltest.UserObj, Perm: 7},
		acltest.Entry{Tag: acltest.User, Perm: 5, ID: 65534},
		acltest.Entry{Tag: acltest.GroupObj, Perm: 5},
		acltest.Entry{Tag: acltest.Mask, Perm: 7},
		acltest.Entry{Tag: acltest.Other},
	)
	d := must[vfs.Entry](t)(l.Mkdir(vfs.RootIno, "d", 0o755, c))
	if err := l.SetXattr(d.Ino(), "system.posix_acl_default", acl, 0); err != nil {
		t.Fatalf("setting a default ACL: %v", err)
	}

	plain := must[vfs.Entry](t)(l.Mknod(vfs.RootIno, "plain", 0o666, 0, c))
	if got := plain.Stat.Mode & 07777; got != 0o644 {
		t.Errorf("mode with umask 022 and no default ACL: %o, want 644", got)
	}
	f := must[vfs.Entry](t)(l.Mknod(d.Ino(), "f", 0o666, 0, c))
	if got := f.Stat.Mode & 07777; got != 0o660 {
		t.Errorf("mode under a default ACL: %o, want 660 (the umask ignored)", got)
	}
	buf := make([]byte, 256)
	n, err := l.GetXattr(f.Ino(), "system.posix_acl_access", buf)
	if err != nil {
		t.Fatalf("inherited access ACL: %v", err)
	}
	if got := aclPerm(buf[:n], acltest.Mask); got != 6 {
		t.Errorf("inherited mask: %o, want 6", got)
	}
	sub := must[vfs.Entry](t)(l.Mkdir(d.Ino(), "sub", 0o777, c))
	if _, err := l.GetXattr(sub.Ino(), "system.posix_acl_default", nil); err != nil {
		t.Errorf("a subdirectory's inherited default ACL: %v", err)
	}

	st := must[unix.Stat_t](t)(l.SetAttr(f.Ino(), nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: 0o640}))
	if st.Mode&07777 != 0o640 {
		t.Errorf("chmod: mode %o", st.Mode&07777)
	}
	n = must[int](t)(l.GetXattr(f.Ino(), "system.posix_acl_access", buf))
	if got := aclPerm(buf[:n], acltest.Mask); got != 4 {
		t.Errorf("mask after chmod 640: %o, want 4", got)
	}

	if err := l.SetXattr(plain.Ino(), "system.posix_acl_access", acl, 0); err != nil {
		t.Fatalf("setting an access ACL: %v", err)
	}
	st = must[unix.Stat_t](t)(l.GetAttr(plain.Ino()))
	if st.Mode&07777 != 0o770 {
		t.Errorf("mode after setting an access ACL: %o, want 770", st.Mode&07777)
	}
	wantErr(t, "a malformed ACL", l.SetXattr(plain.Ino(), "system.posix_acl_access", []byte{2, 0, 0, 0, 1}, 0), syscall.EINVAL)
}
