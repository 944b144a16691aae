// Package acltest encodes POSIX ACLs for tests of the packages that store
// and serve them.
package acltest

import "encoding/binary"

// Entry is one entry of a POSIX ACL.
type Entry struct {
	Tag, Perm uint16
	ID        uint32
}

// The tags of ACL entries (linux/posix_acl.h).
const (
	UserObj  = 0x01
	User     = 0x02
	GroupObj = 0x04
	Mask     = 0x10
	Other    = 0x20
)

// Encode encodes entries, which must be sorted by tag and id, as setfacl
// passes them to setxattr(2) for system.posix_acl_*: a version 2 header,
// then each entry.
func Encode(entries ...Entry) []byte {
	b := binary.LittleEndian.AppendUint32(nil, 2)
	for _, e := range entries {
		id := e.ID
		if e.Tag != User {
			id = ^uint32(0)
		}
		b = binary.LittleEndian.AppendUint16(b, e.Tag)
		b = binary.LittleEndian.AppendUint16(b, e.Perm)
		b = binary.LittleEndian.AppendUint32(b, id)
	}
	return b
}
