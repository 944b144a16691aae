package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"

	"github.com/hanwen/go-fuse/v2/fuse"
	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/vfs"
)

// Handing a mounted connection from one server process to another
// (docs/restart.md). The kernel keeps the mount, the node ids (inode
// numbers) and the file handles (records of the handle table); the
// file system keeps the tree. What passes between servers is a Session:
// the /dev/fuse descriptor, the handle table's memory file and the
// recorded INIT exchange. A successor re-derives node ids on demand (rederiving)
// and reopens every open file and directory from its record.

// Session is what another server needs to serve a mounted connection.
type Session struct {
	// Dev is the connection's /dev/fuse descriptor.
	Dev *os.File
	// Handles is the memory file of the open-handle table.
	Handles *os.File
	// Init is the INIT request the kernel sent when it mounted and the
	// reply it got, verbatim.
	Init []byte
}

// Close closes the session's descriptors.
func (s Session) Close() {
	if s.Dev != nil {
		s.Dev.Close()
	}
	if s.Handles != nil {
		s.Handles.Close()
	}
}

// Session returns a copy of the server's session, with new descriptors:
// for a holder that keeps the connection alive if this process dies. It
// stays valid while the mount exists.
func (s *Server) Session() (Session, error) {
	if s.sess.ring != nil {
		return Session{}, fmt.Errorf("fusefs: session of %s: %w", s.mountpoint, ErrRingHandover)
	}
	dev, err := dupFile(s.sess.devFd, "/dev/fuse")
	if err != nil {
		return Session{}, fmt.Errorf("fusefs: session of %s: %w", s.mountpoint, err)
	}
	handles, err := s.raw.handles.dup()
	if err != nil {
		dev.Close()
		return Session{}, fmt.Errorf("fusefs: session of %s: %w", s.mountpoint, err)
	}
	return Session{Dev: dev, Handles: handles, Init: append([]byte(nil), s.sess.init...)}, nil
}

// Stop stops serving without unmounting, for a successor to Adopt the
// session it returns: it stops reading requests, waits until those read
// are answered, and lets go of its open files and descriptors. Requests
// that arrive meanwhile wait in the kernel. The caller hands the session
// on or closes it. A server on io_uring refuses (ErrRingHandover) and
// goes on serving.
func (s *Server) Stop() (Session, error) {
	if s.sess.ring != nil {
		return Session{}, fmt.Errorf("fusefs: stop %s: %w", s.mountpoint, ErrRingHandover)
	}
	if !s.sess.stop() {
		s.close()
		return Session{}, fmt.Errorf("fusefs: stop %s: the connection has ended", s.mountpoint)
	}
	sess, err := s.Session()
	s.close()
	return sess, err
}

// Adopt serves a connection another server mounted on mountpoint, from
// sess (which Adopt takes over: the caller must not close it). fs must be
// the same tree the other server served, and opts the same options.
//
// With resend false, the other server stopped (Stop): every request it
// read, it answered. With resend true it died: the kernel is asked first
// to send again every request it had sent and had no answer to (Linux >=
// 6.9), and rawFS answers those in the light of what the dead server may
// have done already (see resent).
func Adopt(mountpoint string, sess Session, fs vfs.FS, opts Options, resend bool) (*Server, error) {
	fail := func(err error) (*Server, error) {
		return nil, fmt.Errorf("fusefs: adopt %s: %w", mountpoint, err)
	}
	if sess.Dev == nil || sess.Handles == nil {
		sess.Close()
		return fail(errors.New("incomplete session"))
	}
	if err := refuseRingInit(sess.Init); err != nil {
		sess.Close()
		return fail(err)
	}
	handles, err := mapHandleTable(sess.Handles)
	if err != nil {
		sess.Dev.Close()
		return fail(err)
	}
	dev, err := unix.FcntlInt(sess.Dev.Fd(), unix.F_DUPFD_CLOEXEC, 0)
	sess.Dev.Close()
	if err != nil {
		handles.close()
		return fail(err)
	}
	raw := newRawFS(rederiving(fs), opts, handles)
	s, err := newSession(dev, raw, mountOptions(opts))
	if err != nil {
		handles.close()
		return fail(err)
	}
	srv := &Server{raw: raw, sess: s, mountpoint: mountpoint}
	if err := s.replayInit(sess.Init); err != nil {
		srv.close()
		return fail(err)
	}
	if err := raw.restore(); err != nil {
		srv.close()
		return fail(err)
	}
	if resend {
		if err := s.resend(); err != nil {
			srv.close()
			return fail(fmt.Errorf("FUSE_NOTIFY_RESEND (Linux >= 6.9): %w", err))
		}
	}
	s.serve()
	srv.dev = mountDev(mountpoint)
	return srv, nil
}

// dupFile returns a new descriptor of fd as an *os.File.
func dupFile(fd int, name string) (*os.File, error) {
	nfd, err := unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
	if err != nil {
		return nil, err
	}
	return os.NewFile(uintptr(nfd), name), nil
}

// restore reopens every file and directory of the handle table's records,
// and takes over their passthrough backing files.
func (r *rawFS) restore() error {
	var reopened, dead int
	err := r.handles.restore(func(fh uint64, rec handleRecord) any {
		backed := rec.Backed != 0
		rdwr := isRDWR(rec.Flags, backed)
		if rdwr {
			r.rdwrOpened(rec.Ino, true)
		}
		var h any
		var err error
		switch rec.Kind {
		case recFile:
			var f vfs.File
			// Never create or truncate again; the kernel passes writes
			// with their offsets, so O_APPEND needs no care.
			flags := int(rec.Flags) &^ (unix.O_CREAT | unix.O_EXCL | unix.O_TRUNC)
			f, err = r.fs.Open(rec.Ino, flags, vfs.OpenOptions{Direct: backed})
			if err == unix.ESTALE && rec.HasData != 0 {
				// No name leads to it: removed while open, or an
				// O_TMPFILE. The reference FindOrphan adds stands
				// for the kernel's lookup count (see restart_rederive.go).
				if o, ok := r.fs.(vfs.OrphanFinder); ok && o.FindOrphan(rec.Ino, rec.DataIno, rec.DataGen) == nil {
					f, err = r.fs.Open(rec.Ino, flags, vfs.OpenOptions{Direct: backed})
				}
			}
			if err == nil {
				h = &openFile{File: f, ino: rec.Ino, backed: backed, rdwr: rdwr}
			}
		case recDir:
			h, err = r.fs.OpenDir(rec.Ino)
		case recBacking:
			// A registration kept past its last open; the open records
			// of the inode, if any (a crash between a release and the
			// record), name the same id.
			r.backingMu.Lock()
			defer r.backingMu.Unlock()
			b := r.backing[rec.Ino]
			if b == nil {
				b = &backingFile{id: rec.BackingID, file: fileID{rec.BackingDev, rec.BackingIno}}
				r.backing[rec.Ino] = b
			}
			b.recFh = fh
			r.recordedBacking++
			return &recordedBacking{ino: rec.Ino}
		default:
			err = fmt.Errorf("record kind %d", rec.Kind)
		}
		if backed {
			r.backingMu.Lock()
			b := r.backing[rec.Ino]
			if b == nil {
				b = &backingFile{id: rec.BackingID, file: fileID{rec.BackingDev, rec.BackingIno}}
				r.backing[rec.Ino] = b
			}
			b.refs++
			r.backingMu.Unlock()
		}
		if err != nil {
			// Reads and writes of a passthrough open never come here
			// and go on working; the rest of it fails with EIO.
			klog.InfoS("Open file not reopened after a server change; its requests fail with EIO", "fsName", r.opts.FsName, "ino", rec.Ino, "fh", fh, "err", err)
			dead++
			return &deadHandle{ino: rec.Ino, backed: backed, rdwr: rdwr}
		}
		reopened++
		return h
	})
	if reopened+dead > 0 {
		klog.V(2).InfoS("Open files reopened after a server change", "fsName", r.opts.FsName, "reopened", reopened, "dead", dead)
	}
	return err
}

// replayInit feeds the recorded INIT of a connection that another process
// began (see session.init) into this session's ProtocolServer, which needs
// it to parse requests, and drops the reply: the kernel had its answer
// long ago. What counts is what that answer negotiated: its capabilities
// (the replayed request offers no others, see offering), and its
// max_write, which sizes the request buffers. A server with other options
// would have answered otherwise; that is logged.
func (s *session) replayInit(init []byte) error {
	if len(init) < 8 || binary.LittleEndian.Uint32(init[4:]) != opInit {
		return errors.New("the recorded INIT request is not one")
	}
	n := int(binary.LittleEndian.Uint32(init))
	if n > len(init) {
		return errors.New("the recorded INIT request is cut short")
	}
	req, reply := init[:n], init[n:]
	replayed := req
	var kernel fuse.InitOut
	if len(reply) > 0 {
		var err error
		if kernel, err = parseInitReply(reply); err != nil {
			return fmt.Errorf("the recorded INIT reply: %w", err)
		}
		replayed = offering(req, kernel.Flags64())
	}
	out := make([]byte, s.bufSize)
	w, st := s.serveRequest(replayed, out)
	if !st.Ok() || w == 0 {
		return fmt.Errorf("replaying INIT: %v", st)
	}
	ours, err := parseInitReply(out[:w])
	if err != nil {
		return err
	}
	if len(reply) > 0 {
		s.bufSize = max(s.bufSize, int(kernel.MaxWrite)+64<<10+4096)
	} else {
		kernel, reply = ours, out[:w]
	}
	if ours.Flags64() != kernel.Flags64() || ours.MaxWrite != kernel.MaxWrite {
		klog.InfoS("This server's options differ from those the connection was mounted with; serving by the mount's",
			"fsName", s.raw.opts.FsName, "flags", kernel.Flags64(), "ourFlags", ours.Flags64(),
			"maxWrite", kernel.MaxWrite, "ourMaxWrite", ours.MaxWrite)
	}
	s.init = append(append([]byte(nil), req...), reply...)
	s.raw.negotiated(kernel.Flags64())
	return nil
}

// offering returns a copy of the INIT request req that offers only the
// capabilities in flags, those the connection was mounted with. Replayed
// into a server that would take more (a newer version's), its
// ProtocolServer then parses requests as the kernel sends them: a
// SETXATTR's size, for one, depends on FUSE_SETXATTR_EXT.
func offering(req []byte, flags uint64) []byte {
	// fuse_init_in after the header: major, minor, max_readahead, flags,
	// then flags2 (the high half) from protocol 7.36 on.
	const flagsAt = inHeaderSize + 12
	req = append([]byte(nil), req...)
	le := binary.LittleEndian
	if len(req) >= flagsAt+4 {
		le.PutUint32(req[flagsAt:], le.Uint32(req[flagsAt:])&uint32(flags))
	}
	if len(req) >= flagsAt+8 {
		le.PutUint32(req[flagsAt+4:], le.Uint32(req[flagsAt+4:])&uint32(flags>>32))
	}
	return req
}

// stop stops reading requests and returns once every request read has
// been answered. Requests arriving meanwhile wait in the kernel for the
// connection's next server. It says whether the connection is still alive.
func (s *session) stop() bool {
	s.wakeAll()
	<-s.done
	s.endMu.Lock()
	defer s.endMu.Unlock()
	return s.endErr == nil && !s.ended()
}

// ended says whether the kernel has ended the connection: a read then
// fails with ENODEV at once.
func (s *session) ended() bool {
	var pfd = []unix.PollFd{{Fd: int32(s.devFd), Events: unix.POLLIN}}
	n, err := unix.Poll(pfd, 0)
	return err == nil && n == 1 && pfd[0].Revents&(unix.POLLERR|unix.POLLHUP) != 0
}

// resend asks the kernel to queue again every request it sent on this
// connection and has had no answer to (FUSE_NOTIFY_RESEND, Linux >= 6.9):
// those a dead server read and never answered. It must come before the
// first read, while every unanswered request is the dead server's.
func (s *session) resend() error {
	var msg [outHeaderSize]byte
	binary.LittleEndian.PutUint32(msg[0:], outHeaderSize)
	binary.LittleEndian.PutUint32(msg[4:], notifyResend)
	_, err := unix.Write(s.devFd, msg[:])
	return err
}
