package memfs

import (
	"encoding/binary"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// aclEntry is one entry of a POSIX ACL in its xattr form.
type aclEntry struct {
	tag, perm uint16
	id        uint32
}

// The tags of ACL entries (linux/posix_acl.h).
const (
	aclUserObj  = 0x01
	aclUser     = 0x02
	aclGroupObj = 0x04
	aclMask     = 0x10
	aclOther    = 0x20
)

// encodeACL encodes entries, which must be sorted by tag, in the
// system.posix_acl_* attribute format (version 2).
func encodeACL(entries ...aclEntry) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range entries {
		id := e.id
		if e.tag != aclUser {
			id = ^uint32(0)
		}
		b = binary.LittleEndian.AppendUint16(b, e.tag)
		b = binary.LittleEndian.AppendUint16(b, e.perm)
		b = binary.LittleEndian.AppendUint32(b, id)
	}
	return b
}

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
	acl := encodeACL(
		aclEntry{tag: aclUserObj, perm: 7},
		aclEntry{tag: aclUser, perm: 5, id: 65534},
		aclEntry{tag: aclGroupObj, perm: 5},
		aclEntry{tag: aclMask, perm: 7},
		aclEntry{tag: aclOther},
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
	if got := aclPerm(buf[:n], aclMask); got != 6 {
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
	if got := aclPerm(buf[:n], aclMask); got != 4 {
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
