// Package handoff moves named bundles of open descriptors between
// processes over unix sockets, so that a FUSE connection outlives the
// process serving it (docs/restart.md, issue 7).
//
// A Bundle is one volume's session: an ID, opaque metadata (the driver's
// recorded FUSE INIT and tables; handoff never looks inside) and up to
// MaxFiles descriptors (the /dev/fuse descriptor, a memfd). Two things are
// built on the same messages:
//
//   - the Holder, a small long-lived process (csi-memfs hold, a sidecar
//     container) that keeps a copy of every bundle, so that a crashed
//     plugin's successor gets its connections back with Client.List;
//   - the peer helpers (Listen, DialConn, Conn), which the driver uses for
//     a planned handover between an old and a new plugin process.
//
// # Wire format
//
// Connections are SOCK_SEQPACKET unix sockets, so a message is one
// datagram: the kernel keeps its boundaries and delivers it whole or not at
// all. A message is a 12-byte little-endian header, then three strings,
// with its descriptors attached as one SCM_RIGHTS control message:
//
//	offset size
//	0      1    version (1)
//	1      1    len(op), 1..255
//	2      2    len(id), 0..MaxID
//	4      4    len(data), 0..MaxMeta
//	8      4    number of descriptors attached, 0..MaxFiles
//	12     ...  op, then id, then data
//
// Received descriptors are close-on-exec (recvmsg with MSG_CMSG_CLOEXEC).
// A message that is truncated (MSG_TRUNC, MSG_CTRUNC), has a bad header,
// lengths that do not add up to its size, or a descriptor count other than
// its header's, is refused with ErrBadMessage, and every descriptor that
// came with it is closed: none is ever leaked. The connection stays
// usable, since the next message starts at the next datagram.
//
// # Holder protocol
//
// The client sends one request and waits for its answer, so when Put
// returns the holder has its own copies of the descriptors:
//
//	put  id, meta, files  -> ack      keep the bundle, replacing (and closing) one of that id
//	del  id               -> ack      close and forget the bundle; ack also if absent
//	list                  -> bundle*, end
//	                                  every bundle, sorted by id, with new descriptors
//	anything wrong        -> error    data is the reason; the connection stays usable
//
// The holder never reads the descriptors it holds, with one exception,
// the fallback: when no client has been connected for Holder.Deadline, it
// hands every held /dev/fuse descriptor to Holder.Fallback (fusefs.Refuse
// in csi-memfs hold), which answers queued FUSE requests with EIO so that
// no application hangs while the plugin is crash-looping. The fallback is
// stopped, and has returned, before the holder handles anything of the
// next client to connect. So a plugin keeps one Client open for as long as
// it lives: the open connection is how the holder knows it is there.
//
// A holder that restarts starts empty; the plugin notices its connection
// ending and puts its bundles again.
//
// # Peer protocol
//
// For a planned handover the driver defines the conversation itself from
// Send, Recv and Expect of small control messages (OpAck, OpError, its own
// ops) and SendBundles/RecvBundles, which send bundles as OpBundle
// messages followed by one OpEnd.
//
// # Sockets
//
// Listen (and so NewHolder) binds a temporary name in the socket's
// directory, makes it mode 0600, and renames it over the socket's path. A
// successor therefore replaces its predecessor's socket with no moment at
// which connecting fails: a client reaches the old listener or the new
// one. Sockets are never removed on Close, since by then the path may
// belong to a successor; connecting to a stale one fails with
// ECONNREFUSED. Whoever can connect can take every held descriptor, so the
// socket's directory must be reachable by root only.
package handoff
