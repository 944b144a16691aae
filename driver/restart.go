package driver

import (
	"context"
	"encoding/binary"
	"errors"
	"fmt"
	"path/filepath"
	"sync"
	"time"

	"github.com/go-logr/logr"
	"google.golang.org/grpc/codes"
	"k8s.io/klog/v2"
	"k8s.io/mount-utils"

	"github.com/csi-memfs/csi-memfs/handoff"
	"github.com/csi-memfs/csi-memfs/volume"
)

// Restarts without downtime (docs/restart.md): the handover a process
// gives its successor, the takeover by which a starting process serves its
// predecessor's volumes again, and the link that keeps the holder's copies
// of the sessions up to date.
//
// A volume's FUSE connection outlives the process serving it in two ways:
//
//   - Planned: a new process started beside a running one (a DaemonSet
//     rollout with maxSurge) connects to the old one's handover socket in
//     the state directory. The old process stops serving every volume
//     (requests read are answered, new ones wait in the kernel), sends
//     each volume's session and waits for the new one to adopt
//     them. It then stops serving CSI and idles until it is told to exit,
//     which it does without unmounting anything.
//   - Crash: every published volume's session is also kept by the holder
//     (csi-memfs hold, a second container of the plugin pod, on
//     holder.sock). A process that finds no predecessor to take over from
//     gets the sessions back from the holder and adopts them with a resend
//     of the requests the dead process never answered.
//
// Either way the successor rebuilds each volume from its journal record
// and its memory layer, still mounted under the state directory, re-pins
// its image, and serves the kernel's connection from where the predecessor
// left it (volume.Adopt). A volume with a record but no session is lost,
// as before: its mount answers ENOTCONN until kubelet unpublishes it.
//
// Lock order (below the package's):
//
//	Driver.rpcMu       held for writing by a handover, which so waits for the
//	                   Node calls in flight
//	  registry.locks[volume id]
//	    entry.mu       a session is taken under the volume's lock, so that
//	                   its server is not unmounted meanwhile
//	      holderLink.mu
//
// A takeover runs in New, before anything else can reach the volumes.

// Sockets in the state directory.
const (
	handoverSocket = "handover.sock"
	holderSocket   = "holder.sock"
)

// opHandover asks a running process to hand its volumes over.
const opHandover = "handover"

// handoverTimeout bounds a planned handover: the old process first waits
// for its CSI calls in flight (a publish may wait for an image pull).
const handoverTimeout = 3 * time.Minute

// takeover is where a starting process gets its volumes' sessions.
type takeover struct {
	// sessions are the volumes' sessions, by volume id.
	sessions map[string]volume.Session
	// resend is true for sessions of a process that died: the kernel
	// resends what it never answered.
	resend bool
	// peer is the connection to the process that handed over, which waits
	// for an acknowledgement; nil after a crash.
	peer *handoff.Conn
	// how names the source, for logs and metrics: "handover", "holder" or
	// "" for none.
	how string
	// unserved is when the volumes stopped being served: when the
	// predecessor stopped them for the handover (as it says; else when
	// this process asked for them), or, after a crash, this process's
	// start (the crash came earlier, by an unknown time). The pause is
	// measured from it.
	unserved time.Time
}

// processStart is when this process started: after a crash, the volumes
// have been unserved at least since.
var processStart = time.Now()

// close drops the sessions (a start that failed).
func (t takeover) close() {
	for _, s := range t.sessions {
		s.Close()
	}
	if t.peer != nil {
		t.peer.Close()
	}
}

// takeSessions gets the sessions of the volumes a previous process served:
// from that process if it still runs, else from the holder.
func (d *Driver) takeSessions(logger logr.Logger) takeover {
	bundles, stopped, peer, err := d.askHandover(logger)
	if err != nil {
		if !errors.Is(err, errNoPeer) {
			logger.Error(err, "Planned handover failed; recovering from the holder instead")
		}
		return d.takeFromHolder(logger)
	}
	return takeover{sessions: sessionsOf(logger, bundles), peer: peer, how: "handover", unserved: stopped}
}

// takeFromHolder gets the sessions the holder keeps, if there is one.
func (d *Driver) takeFromHolder(logger logr.Logger) takeover {
	none := takeover{sessions: map[string]volume.Session{}}
	c, err := handoff.Dial(filepath.Join(d.cfg.StateDir, holderSocket))
	if err != nil {
		logger.V(2).Info("No session holder to recover volumes from", "err", err)
		return none
	}
	defer c.Close()
	bundles, err := c.List()
	if err != nil {
		logger.Error(err, "Getting the volumes' sessions from the holder")
		return none
	}
	return takeover{sessions: sessionsOf(logger, bundles), resend: true, how: "holder", unserved: processStart}
}

// sessionsOf unpacks bundles by volume id, dropping malformed ones.
func sessionsOf(logger logr.Logger, bundles []handoff.Bundle) map[string]volume.Session {
	m := map[string]volume.Session{}
	for _, b := range bundles {
		if s, err := volume.SessionOf(b); err != nil {
			logger.Error(err, "Ignoring a malformed session")
		} else {
			m[b.ID] = s
		}
	}
	return m
}

// errNoPeer: no process answers on the handover socket.
var errNoPeer = errors.New("no running plugin process to take over from")

// askHandover asks a running predecessor for its volumes, and returns
// them with the time it stopped serving them.
func (d *Driver) askHandover(logger logr.Logger) ([]handoff.Bundle, time.Time, *handoff.Conn, error) {
	c, err := handoff.DialConn(filepath.Join(d.cfg.StateDir, handoverSocket))
	if err != nil {
		return nil, time.Time{}, nil, errNoPeer
	}
	logger.Info("Taking over the volumes of the running plugin process")
	c.SetDeadline(time.Now().Add(handoverTimeout))
	asked := time.Now()
	if err := c.Send(handoff.Msg{Op: opHandover}); err != nil {
		c.Close()
		return nil, time.Time{}, nil, errNoPeer // it was on its way out
	}
	bundles, stopped, err := recvSessions(c)
	if err != nil {
		c.Close()
		return nil, time.Time{}, nil, fmt.Errorf("receiving the sessions: %w", err)
	}
	if stopped.Before(asked) || stopped.After(time.Now()) {
		stopped = asked // a predecessor that does not say, or a clock that jumped
	}
	return bundles, stopped, c, nil
}

// sendSessions sends bundles as handoff.Conn.SendBundles does, the end
// message carrying stopped, the time this process stopped serving them
// (a predecessor's RecvBundles ignores it).
func sendSessions(c *handoff.Conn, bundles []handoff.Bundle, stopped time.Time) error {
	for _, b := range bundles {
		if err := c.Send(handoff.Msg{Op: handoff.OpBundle, ID: b.ID, Data: b.Meta, Files: b.Files}); err != nil {
			return err
		}
	}
	return c.Send(handoff.Msg{Op: handoff.OpEnd, Data: binary.LittleEndian.AppendUint64(nil, uint64(stopped.UnixNano()))})
}

// recvSessions receives what sendSessions sent; the time is zero when the
// sender did not give it. On error the bundles received are closed.
func recvSessions(c *handoff.Conn) ([]handoff.Bundle, time.Time, error) {
	var bundles []handoff.Bundle
	for {
		m, err := c.Recv()
		if err == nil && m.Op == handoff.OpBundle {
			bundles = append(bundles, handoff.Bundle{ID: m.ID, Meta: m.Data, Files: m.Files})
			continue
		}
		if err == nil && m.Op == handoff.OpEnd {
			var stopped time.Time
			if len(m.Data) == 8 {
				stopped = time.Unix(0, int64(binary.LittleEndian.Uint64(m.Data)))
			}
			m.Close()
			return bundles, stopped, nil
		}
		if err == nil {
			m.Close()
			err = fmt.Errorf("handoff: got %q among bundles", m.Op)
		}
		for _, b := range bundles {
			b.Close()
		}
		return nil, time.Time{}, err
	}
}

// adopt serves a recorded volume again from its session. On failure the
// session is closed and the volume is left to be registered lost.
func (d *Driver) adopt(logger logr.Logger, r record, s volume.Session, resend bool) (*entry, error) {
	id := r.VolumeID
	e := &entry{rec: r, reserved: r.Spec.Params.Size, upper: d.journal.upperDir(id)}
	var lower string
	if r.ImageDigest != "" {
		img := d.repin(logger, r)
		if img == nil {
			s.Close()
			return nil, fmt.Errorf("volume %s: image %s is not in the cache", id, r.ImageDigest)
		}
		dir, err := lowerDir(img, r.Spec.Params.ImagePath)
		if err != nil {
			s.Close()
			return nil, fmt.Errorf("volume %s: %w", id, err)
		}
		e.img, lower = img, dir
	}
	vol, err := volume.Adopt(d.volumeConfig(id, r.Spec, lower), s, resend)
	if err != nil {
		if e.img != nil {
			e.img.Release()
		}
		return nil, fmt.Errorf("volume %s: %w", id, err)
	}
	e.vol = vol
	warnDegraded(logger.WithValues("volumeID", id), vol)
	return e, nil
}

// recover serves again the volumes the journal records, from the sessions
// a predecessor hands over or the holder kept; a recorded volume with no
// session, one that cannot be served again, or one whose record cannot be
// read, is registered as lost (see "Restarts" in the package doc). A lost
// volume whose memory layer is still mounted keeps its reservation in the
// budget.
func (d *Driver) recover(logger logr.Logger, t takeover) error {
	recs, damaged, err := d.journal.load(logger)
	if err != nil {
		t.close()
		return err
	}
	var adopted, lost int
	for _, r := range recs {
		if s, ok := t.sessions[r.VolumeID]; ok {
			delete(t.sessions, r.VolumeID)
			e, err := d.adopt(logger, r, s, t.resend)
			if err == nil {
				d.budget.force(e.reserved)
				d.vols.put(e)
				adopted++
				continue
			}
			logger.Error(err, "Could not serve a volume of the previous plugin process again; it is lost", "volumeID", r.VolumeID)
		}
		lost++
		e := &entry{rec: r, lost: true, upper: d.journal.upperDir(r.VolumeID), img: d.repin(logger, r)}
		if d.upperHeld(e.upper) {
			e.reserved = r.Spec.Params.Size
		}
		d.budget.force(e.reserved)
		d.vols.put(e)
		logger.Info("Found a volume of a previous plugin process that no session serves; it stays lost until unpublished",
			"volumeID", r.VolumeID, "podNamespace", r.Pod.Namespace, "podName", r.Pod.Name,
			"targetPath", r.Spec.TargetPath, "memoryHeld", e.reserved > 0)
	}
	for _, dr := range damaged {
		// Only the id is known: the target comes with the unpublish,
		// the size from the memory layer if it is still mounted.
		lost++
		e := &entry{rec: record{Version: recordVersion, VolumeID: dr.id}, lost: true, damaged: true, upper: d.journal.upperDir(dr.id)}
		if d.upperHeld(e.upper) {
			if u, err := volume.UpperUsage(e.upper); err == nil {
				e.reserved = int64(u.BytesLimit)
			}
		}
		d.budget.force(e.reserved)
		d.vols.put(e)
		logger.Error(dr.err, "Cannot read the journal record of a volume; it is set aside as lost until unpublished",
			"volumeID", dr.id, "memoryHeld", e.reserved > 0)
	}
	for id, s := range t.sessions {
		// A session with no record: its volume was unpublished, and only
		// the holder's copy kept the connection. (Or its record is
		// damaged: with no spec, it cannot be served again.)
		logger.V(2).Info("Dropping the session of a volume that is not recorded", "volumeID", id)
		s.Close()
	}
	if t.peer != nil {
		t.peer.Send(handoff.Msg{Op: handoff.OpAck})
		t.peer.Close()
	}
	d.metrics.lost.Add(float64(lost))
	if t.how != "" {
		pause := time.Since(t.unserved)
		d.metrics.observeTakeover(t.how, pause, adopted)
		logger.Info("Took over the volumes of the previous plugin process", "from", t.how,
			"recovered", adopted, "lost", lost, "pause", pause)
	}
	return nil
}

// upperHeld says whether a memory layer is still mounted on upper.
func (d *Driver) upperHeld(upper string) bool {
	notMnt, err := mount.IsNotMountPoint(d.mounter, upper)
	return err == nil && !notMnt
}

// serveHandover answers a successor's handover request on lis: it stops
// every volume, sends their sessions, and once the successor acknowledges,
// closes handedOver. Until then, and if the successor fails, it keeps
// serving: a volume whose session could not be sent is served again by
// nobody but the holder's copy (the successor, or the next one, recovers
// it from there).
func (d *Driver) serveHandover(ctx context.Context, lis *handoff.Listener, handedOver chan<- struct{}) {
	logger := klog.FromContext(ctx)
	for {
		c, err := lis.Accept()
		if err != nil {
			return // closed
		}
		c.SetDeadline(time.Now().Add(handoverTimeout))
		m, err := c.Recv()
		if err != nil || m.Op != opHandover {
			m.Close()
			c.Close()
			continue
		}
		start := time.Now()
		bundles, stopped := d.stopAll(ctx)
		// The successor opens the image cache only once this process
		// has let go of it.
		d.images.Close()
		err = sendSessions(c, bundles, stopped)
		for _, b := range bundles {
			b.Close()
		}
		if err == nil {
			_, err = c.Expect(handoff.OpAck)
		}
		c.Close()
		if err != nil {
			d.metrics.handovers.WithLabelValues("failed").Inc()
			logger.Error(err, "The successor did not take the volumes over; the holder keeps them")
		} else {
			d.metrics.handovers.WithLabelValues("ok").Inc()
			logger.Info("Handed every volume over to the successor", "volumes", len(bundles), "duration", time.Since(start))
		}
		lis.Close()
		close(handedOver)
		return
	}
}

// stopAll stops serving every volume and returns their sessions, and when
// it began to stop them. Volumes leave the registry (not the journal, which
// is the successor's now). From now on CSI calls are refused.
func (d *Driver) stopAll(ctx context.Context) ([]handoff.Bundle, time.Time) {
	logger := klog.FromContext(ctx)
	d.handingOver.Store(true)
	d.rpcMu.Lock() // wait for the Node calls in flight
	defer d.rpcMu.Unlock()
	stopped := time.Now()
	var bundles []handoff.Bundle
	var mu sync.Mutex
	var wg sync.WaitGroup
	// Not ctx: it may be done already (stopping at SIGTERM).
	lctx, cancel := context.WithTimeout(context.Background(), handoverTimeout)
	defer cancel()
	for _, e := range d.vols.snapshot() {
		wg.Add(1)
		go func() {
			defer wg.Done()
			unlock, err := d.vols.lock(lctx, e.id())
			if err != nil {
				return
			}
			defer unlock()
			e.mu.Lock()
			defer e.mu.Unlock()
			if e.vol == nil {
				return // lost: the successor finds it in the journal
			}
			s, err := e.vol.Stop()
			d.metrics.retire(e.vol)
			e.vol = nil
			if e.img != nil {
				e.img.Release()
				e.img = nil
			}
			d.vols.remove(e.id())
			d.budget.release(e.reserved)
			if err != nil {
				logger.Error(err, "Stopping a volume for the handover", "volumeID", e.id())
				return
			}
			mu.Lock()
			bundles = append(bundles, s.Bundle(e.id()))
			mu.Unlock()
		}()
	}
	wg.Wait()
	return bundles, stopped
}

// awaitSuccessor waits up to Config.HandoverWait, once told to stop, for a
// successor to take the volumes over, and says whether one did.
func (d *Driver) awaitSuccessor(logger logr.Logger, handedOver <-chan struct{}) bool {
	if d.cfg.HandoverWait <= 0 || d.vols.len() == 0 {
		return false
	}
	logger.Info("Waiting for a successor to take the volumes over", "volumes", d.vols.len(), "wait", d.cfg.HandoverWait)
	select {
	case <-handedOver:
		return true
	case <-time.After(d.cfg.HandoverWait):
		return false
	}
}

// errHandingOver refuses CSI calls once volumes are being handed over.
var errHandingOver = errorf(codes.Unavailable, "this plugin process has handed its volumes over to a newer one")

// holderLink keeps the holder up to date with the sessions of the
// volumes this process serves. The holder is optional: without one, a
// crash loses the volumes (they answer ENOTCONN), as with any FUSE driver.
type holderLink struct {
	// path is the holder's socket. Immutable.
	path string
	// mu protects c.
	mu sync.Mutex
	// c is the connection to the holder; nil while there is none. A
	// holder that restarts starts empty, so a new connection is given
	// every session again (keep). Protected by mu.
	c *handoff.Client
}

// put gives the holder a copy of volume id's session.
func (h *holderLink) put(id string, vol *volume.Volume) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.c == nil {
		return // keep puts it when the holder comes
	}
	h.putLocked(id, vol)
}

// putLocked is put.
//
// Preconditions:
//   - h.mu is locked and h.c is not nil.
func (h *holderLink) putLocked(id string, vol *volume.Volume) {
	s, err := vol.Session()
	if err != nil {
		klog.ErrorS(err, "Session of a volume for the holder", "volumeID", id)
		return
	}
	defer s.Close()
	if err := h.c.Put(s.Bundle(id)); err != nil {
		klog.ErrorS(err, "The session holder refused a volume; reconnecting", "volumeID", id)
		h.c.Close()
		h.c = nil
	}
}

// del tells the holder volume id is gone.
func (h *holderLink) del(id string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if h.c != nil {
		if err := h.c.Del(id); err != nil {
			h.c.Close()
			h.c = nil
		}
	}
}

// keep connects to the holder, and again whenever the connection breaks,
// and gives every volume of vols its session each time; it checks the
// connection every period. It returns when ctx is done.
func (h *holderLink) keep(ctx context.Context, vols *registry, period time.Duration) {
	t := time.NewTicker(period)
	defer t.Stop()
	for {
		h.mu.Lock()
		// A cheap request, answered even for an unknown id: is the holder
		// still there? ("-" starts no volume id.)
		if h.c != nil && h.c.Del("-ping") != nil {
			h.c.Close()
			h.c = nil
		}
		fresh := false
		if h.c == nil {
			if c, err := handoff.Dial(h.path); err == nil {
				h.c, fresh = c, true
			}
		}
		h.mu.Unlock()
		if fresh {
			n := 0
			for _, e := range vols.snapshot() {
				e.mu.RLock()
				if e.vol != nil {
					h.put(e.id(), e.vol)
					n++
				}
				e.mu.RUnlock()
			}
			klog.V(2).InfoS("Connected to the session holder", "volumes", n)
		}
		select {
		case <-ctx.Done():
			h.mu.Lock()
			if h.c != nil {
				h.c.Close()
				h.c = nil
			}
			h.mu.Unlock()
			return
		case <-t.C:
		}
	}
}
