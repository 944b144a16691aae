package handoff

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"slices"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
	"k8s.io/klog/v2"
)

// Holder ops (see the package doc).
const (
	opPut  = "put"
	opDel  = "del"
	opList = "list"
)

// A Holder keeps copies of bundles for its clients and gives them back.
//
// Lock order: Holder.mu is the only lock. The fallback goroutines never
// take it, so that it may be held while waiting for them to end.
type Holder struct {
	// Deadline is how long the holder waits, once no client is
	// connected, before it starts Fallback on the held FUSE devices.
	// Zero or less disables the fallback. Set before Serve.
	Deadline time.Duration
	// Fallback, if set, serves one held /dev/fuse connection while no
	// client is connected (fusefs.Refuse: every request gets EIO) and
	// returns soon after stop is closed. It gets a descriptor of its own,
	// closed after it returns. Set before Serve.
	Fallback func(dev *os.File, stop <-chan struct{}) error

	// path is the socket's path. Immutable.
	path string

	mu sync.Mutex
	// ln is the listener. Protected by mu; replaced by reclaim, closed by
	// Serve's end and by Close.
	ln *Listener
	// bundles are the held bundles by ID. Protected by mu; a held
	// bundle's fields are immutable, and its descriptors are closed only
	// by whoever removes it from the map.
	bundles map[string]held
	// clients counts connected clients. Protected by mu.
	clients int
	// idleGen counts connections; a deadline timer started in an earlier
	// generation does nothing. Protected by mu.
	idleGen uint64
	// timer is the pending deadline timer, or nil. Protected by mu.
	timer *time.Timer
	// stop, while the fallback runs, is its stop channel; else nil.
	// Protected by mu.
	// Invariant: stop != nil implies clients == 0. So no bundle changes
	// while the fallback runs (only clients change bundles), and no
	// client ever sees a descriptor the fallback is reading.
	stop chan struct{}
	// since is when the running fallback began. Protected by mu.
	since time.Time
	// done is set when Serve has returned: no fallback starts after it.
	// Protected by mu.
	done bool
	// fallbacks counts running fallback goroutines.
	fallbacks sync.WaitGroup
}

// held is one bundle the holder keeps. Immutable.
type held struct {
	meta []byte
	// fds are the holder's own descriptors.
	fds []int
}

// NewHolder listens on sockPath (see Listen) for clients.
func NewHolder(sockPath string) (*Holder, error) {
	ln, err := Listen(sockPath)
	if err != nil {
		return nil, err
	}
	return &Holder{path: sockPath, ln: ln, bundles: map[string]held{}}, nil
}

// reclaimPeriod is how often a Holder whose socket path another holder
// took checks whether that one is gone. A variable for the tests.
var reclaimPeriod = 2 * time.Second

// listener returns the current listener.
func (h *Holder) listener() *Listener {
	h.mu.Lock()
	defer h.mu.Unlock()
	return h.ln
}

// reclaim listens on the socket path again when another holder took it
// and is gone since, so that a plugin restarting later finds this holder.
// That happens when a rolling update is undone: the new pod's holder took
// the path, and went with its pod.
func (h *Holder) reclaim(ctx context.Context) {
	t := time.NewTicker(reclaimPeriod)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
		if h.listener().owns() || !abandoned(h.path) {
			continue
		}
		ln, err := Listen(h.path)
		if err != nil {
			klog.ErrorS(err, "Cannot take the holder socket back")
			continue
		}
		h.mu.Lock()
		if ctx.Err() != nil {
			h.mu.Unlock()
			ln.Close()
			return
		}
		old := h.ln
		h.ln = ln
		h.mu.Unlock()
		old.Close() // Serve's Accept moves to ln
		klog.InfoS("Took the holder socket back: the holder that had taken it is gone", "socket", h.path)
	}
}

// Serve serves clients until ctx is done, then stops the fallback and
// returns nil. The held bundles stay until Close.
func (h *Holder) Serve(ctx context.Context) error {
	var conns sync.WaitGroup
	defer func() {
		h.mu.Lock()
		h.done = true
		if h.timer != nil {
			h.timer.Stop()
			h.timer = nil
		}
		h.stopFallbackLocked()
		h.mu.Unlock()
	}()
	defer conns.Wait()
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	defer context.AfterFunc(ctx, func() {
		h.mu.Lock()
		defer h.mu.Unlock()
		h.ln.Close()
	})()
	conns.Add(1)
	go func() { defer conns.Done(); h.reclaim(ctx) }()

	h.mu.Lock()
	if h.clients == 0 {
		h.armLocked()
	}
	h.mu.Unlock()
	klog.InfoS("Holding sessions", "socket", h.path, "deadline", h.Deadline)
	for {
		ln := h.listener()
		c, err := ln.Accept()
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			if h.listener() != ln {
				continue // reclaimed: accept on the new listener
			}
			if errors.Is(err, syscall.EMFILE) || errors.Is(err, syscall.ENFILE) {
				klog.ErrorS(err, "Cannot accept a client")
				time.Sleep(100 * time.Millisecond)
				continue
			}
			return err
		}
		conns.Add(1)
		go func() {
			defer conns.Done()
			h.serveConn(ctx, c)
		}()
	}
}

// Len returns the number of bundles held.
func (h *Holder) Len() int {
	h.mu.Lock()
	defer h.mu.Unlock()
	return len(h.bundles)
}

// Close stops listening and closes every held descriptor. A FUSE
// connection of which the holder had the last descriptor is aborted by
// the kernel. Call it after Serve has returned.
func (h *Holder) Close() error {
	h.mu.Lock()
	defer h.mu.Unlock()
	err := h.ln.Close()
	if errors.Is(err, net.ErrClosed) {
		err = nil
	}
	for id, b := range h.bundles {
		closeFds(b.fds)
		delete(h.bundles, id)
	}
	return err
}

// serveConn answers one client until it goes or ctx is done. A connection
// counts as a client from its first request on: one that sends nothing (a
// probe, see abandoned) neither ends the fallback nor restarts the
// deadline.
func (h *Holder) serveConn(ctx context.Context, c *Conn) {
	defer c.Close()
	defer context.AfterFunc(ctx, func() { c.Close() })()
	counted := false
	defer func() {
		if counted {
			h.disconnected()
		}
	}()
	for {
		r, err := c.recvRaw()
		if !counted && err == nil {
			h.connected()
			counted = true
		}
		if errors.Is(err, ErrBadMessage) {
			klog.ErrorS(err, "Refusing a client's message")
			err = c.sendRaw(OpError, "", []byte(err.Error()), nil)
		} else if err == nil {
			err = h.handle(c, r)
		}
		if err != nil {
			if !errors.Is(err, io.EOF) && ctx.Err() == nil {
				klog.ErrorS(err, "Client connection failed")
			}
			return
		}
	}
}

// handle answers one request; an error means the connection is unusable.
func (h *Holder) handle(c *Conn, r rawMsg) error {
	switch {
	case r.op == opPut && r.id != "":
		h.put(r)
	case r.op == opDel && r.id != "" && len(r.fds) == 0:
		h.del(r.id)
	case r.op == opList && len(r.fds) == 0:
		return h.list(c)
	default:
		r.close()
		return c.sendRaw(OpError, "", fmt.Appendf(nil, "bad %q request: unknown op, no id, or descriptors where none belong", r.op), nil)
	}
	return c.sendRaw(OpAck, r.id, nil, nil)
}

// put keeps r as the bundle r.id, closing the one it replaces.
func (h *Holder) put(r rawMsg) {
	h.mu.Lock()
	old, replaced := h.bundles[r.id]
	h.bundles[r.id] = held{meta: r.data, fds: r.fds}
	n := len(h.bundles)
	h.mu.Unlock()
	closeFds(old.fds)
	klog.InfoS("Holding session", "id", r.id, "metaBytes", len(r.data), "files", len(r.fds), "replaced", replaced, "held", n)
}

// del closes and forgets the bundle id.
func (h *Holder) del(id string) {
	h.mu.Lock()
	old, found := h.bundles[id]
	delete(h.bundles, id)
	n := len(h.bundles)
	h.mu.Unlock()
	closeFds(old.fds)
	klog.InfoS("Dropped session", "id", id, "found", found, "held", n)
}

// list sends every bundle, then OpEnd. It sends duplicates made under the
// lock: a held descriptor may be closed by another client's put or del
// while the sends go on, and its number be reused.
func (h *Holder) list(c *Conn) error {
	type dupped struct {
		id   string
		meta []byte
		fds  []int
	}
	var all []dupped
	defer func() {
		for _, d := range all {
			closeFds(d.fds)
		}
	}()
	h.mu.Lock()
	ids := make([]string, 0, len(h.bundles))
	for id := range h.bundles {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	var err error
	for _, id := range ids {
		b := h.bundles[id]
		d := dupped{id: id, meta: b.meta}
		for _, fd := range b.fds {
			var nfd int
			nfd, err = unix.FcntlInt(uintptr(fd), unix.F_DUPFD_CLOEXEC, 0)
			if err != nil {
				break
			}
			d.fds = append(d.fds, nfd)
		}
		all = append(all, d)
		if err != nil {
			break
		}
	}
	h.mu.Unlock()
	if err != nil {
		klog.ErrorS(err, "Cannot list sessions")
		return c.sendRaw(OpError, "", fmt.Appendf(nil, "duplicating descriptors: %v", err), nil)
	}
	for _, d := range all {
		if err := c.sendRaw(OpBundle, d.id, d.meta, d.fds); err != nil {
			return err
		}
	}
	klog.V(2).InfoS("Listed sessions", "count", len(all))
	return c.sendRaw(OpEnd, "", nil, nil)
}

// connected counts a client in. It ends a running fallback, and waits for
// it, before the client's first request is handled.
func (h *Holder) connected() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.clients++
	h.idleGen++
	if h.timer != nil {
		h.timer.Stop()
		h.timer = nil
	}
	h.stopFallbackLocked()
}

// disconnected counts a client out; the last one starts the deadline.
func (h *Holder) disconnected() {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.clients--
	if h.clients == 0 {
		h.armLocked()
	}
}

// armLocked starts the deadline timer.
//
// Preconditions:
//   - h.mu is locked.
//   - h.clients == 0 and no timer is pending.
func (h *Holder) armLocked() {
	if h.Fallback == nil || h.Deadline <= 0 || h.done {
		return
	}
	gen := h.idleGen
	h.timer = time.AfterFunc(h.Deadline, func() { h.startFallback(gen) })
}

// startFallback runs Fallback on every held FUSE device, unless a client
// has connected since generation gen began.
func (h *Holder) startFallback(gen uint64) {
	h.mu.Lock()
	defer h.mu.Unlock()
	if gen != h.idleGen || h.clients > 0 || h.stop != nil || h.done {
		return
	}
	h.timer = nil
	type dev struct {
		id string
		fd int
	}
	var devs []dev
	for id, b := range h.bundles {
		for _, fd := range b.fds {
			if isFUSEDevice(fd) {
				devs = append(devs, dev{id, fd})
			}
		}
	}
	if len(devs) == 0 {
		return
	}
	stop := make(chan struct{})
	h.stop, h.since = stop, time.Now()
	klog.InfoS("No plugin connected within the deadline; answering FUSE requests with EIO until one does",
		"deadline", h.Deadline, "connections", len(devs))
	for _, d := range devs {
		// A descriptor of its own: closing the *os.File closes it, and
		// the held one is not made pollable.
		nfd, err := unix.FcntlInt(uintptr(d.fd), unix.F_DUPFD_CLOEXEC, 0)
		if err != nil {
			klog.ErrorS(err, "Cannot start the fallback", "id", d.id)
			continue
		}
		f := os.NewFile(uintptr(nfd), "/dev/fuse")
		h.fallbacks.Add(1)
		go func() {
			defer h.fallbacks.Done()
			defer f.Close()
			if err := h.Fallback(f, stop); err != nil {
				klog.ErrorS(err, "Fallback failed", "id", d.id)
			}
		}()
	}
}

// stopFallbackLocked ends a running fallback and waits until every
// goroutine of it has returned.
//
// Preconditions:
//   - h.mu is locked.
func (h *Holder) stopFallbackLocked() {
	if h.stop == nil {
		return
	}
	close(h.stop)
	h.stop = nil
	h.fallbacks.Wait()
	klog.InfoS("Stopped answering FUSE requests with EIO", "after", time.Since(h.since).Round(time.Millisecond))
}

// fuseDev is /dev/fuse's device number (misc, minor 229).
var fuseDev = unix.Mkdev(10, 229)

// isFUSEDevice says whether fd is a /dev/fuse descriptor.
func isFUSEDevice(fd int) bool {
	var st unix.Stat_t
	return unix.Fstat(fd, &st) == nil && st.Mode&unix.S_IFMT == unix.S_IFCHR && st.Rdev == fuseDev
}
