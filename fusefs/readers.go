package fusefs

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// How many readers a session runs. One reader serves a connection's
// requests one after another while they are quick. The process's watch
// looks at the busy sessions every tick (stuckTick) and adds a helper
// reader where:
//   - one request has held every reader for the tick (stuck): up to
//     maxReaders, so a slow request (a copy-up, a large write through the
//     daemon) holds up only its caller;
//   - requests kept every reader busy for the whole tick, none waiting
//     for the kernel once (saturated): up to saturatedReaders.
//
// A reader that finds the queue empty while another already waits ends
// (session.read), so helpers go when the burst is over.
//
// Why not a spare reader always waiting, as go-fuse and libfuse keep: on
// this 2-CPU VM waking a second thread costs more than a quick request.
// A close's RELEASE, sent in the background, comes with the caller's next
// request, so the spare woke all the time; the loop of 0.1.x started and
// ended 18,000-20,000 readers in a metadata run of 180,000 requests. One
// reader served the same run with 0.9 context switches per request
// instead of 1.6 and 20 us of CPU instead of 33 (BENCHMARKS.md,
// "Session 10").

// stuckTick is how often the watch looks at the sessions that have a
// request in service: a request still held after one tick and at most two
// gets a helper reader for the requests behind it.
const stuckTick = time.Millisecond

// quietTicks is how many ticks without a request taken by any session the
// watch waits before it sleeps until the next request.
const quietTicks = 10

// readerWatch starts helper readers for stuck and saturated sessions. It
// ticks only while requests are being served, and a process has one: its
// cost is one wake-up per tick however many volumes are busy.
type readerWatch struct {
	// mu protects sessions.
	mu sync.Mutex
	// sessions maps the serving sessions to what they had done at the
	// last tick.
	sessions map[*session]progress
	// asleep says the watch waits for a kick and looks at no session.
	// Invariant, with session.idle: a reader that takes a request while
	// no other waits sees asleep set and kicks, or the watch, having set
	// it, sees that reader's idle count at zero and stays awake (both are
	// sequentially consistent atomics, stored before they are loaded).
	asleep atomic.Bool
	// kick wakes a sleeping watch; it holds at most one token.
	kick chan struct{}
	// start starts the watch's goroutine once.
	start sync.Once
}

// watch is the process's readerWatch.
var watch = readerWatch{sessions: map[*session]progress{}, kick: make(chan struct{}, 1)}

// progress is a session's counts at a tick.
type progress struct{ taken, waits uint64 }

// progressOf reads s's counts.
func progressOf(s *session) progress {
	return progress{taken: s.taken.Load(), waits: s.waits.Load()}
}

// add makes s watched until remove.
func (w *readerWatch) add(s *session) {
	w.mu.Lock()
	w.sessions[s] = progressOf(s)
	w.mu.Unlock()
	w.start.Do(func() {
		w.asleep.Store(true)
		go w.run()
	})
}

// remove stops watching s.
func (w *readerWatch) remove(s *session) {
	w.mu.Lock()
	delete(w.sessions, s)
	w.mu.Unlock()
}

// busy is what a reader calls having taken a request while no other
// reader of its session waits for the kernel.
func (w *readerWatch) busy() {
	if w.asleep.Load() && w.asleep.CompareAndSwap(true, false) {
		select {
		case w.kick <- struct{}{}:
		default:
		}
	}
}

// run ticks while requests are served and sleeps between bursts.
func (w *readerWatch) run() {
	for range w.kick {
		tick := time.NewTicker(stuckTick)
		for quiet := 0; quiet < quietTicks; {
			<-tick.C
			if w.look() {
				quiet = 0
			} else {
				quiet++
			}
			if quiet == quietTicks {
				w.asleep.Store(true)
				if w.anyHeld() && w.asleep.CompareAndSwap(true, false) {
					// A request was taken meanwhile, whose reader may
					// have found the watch still awake: go on.
					quiet = 0
				}
			}
		}
		tick.Stop()
	}
}

// look starts a helper reader for each stuck or saturated session. It
// says whether any session took a request or has one in service.
func (w *readerWatch) look() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	active := false
	for s, last := range w.sessions {
		now := progressOf(s)
		held := s.idle.Load() == 0
		if now.taken != last.taken || held {
			active = true
		}
		switch {
		case held && now.taken == last.taken:
			// Stuck: a request has held every reader for a tick.
			s.addReader(maxReaders, &s.stuckHelpers)
		case held && now.waits == last.waits:
			// Saturated: requests kept every reader busy for a tick.
			s.addReader(saturatedReaders(), &s.saturatedHelpers)
		}
		w.sessions[s] = now
	}
	return active
}

// saturatedReaders bounds the readers of a session that is never idle
// for a tick: half the CPUs the runtime uses, the rest left to the
// callers, whose every request costs them as much CPU in the kernel.
func saturatedReaders() int32 {
	return int32(max(1, min(maxReaders, runtime.GOMAXPROCS(0)/2)))
}

// anyHeld says whether a session has every reader in a request.
func (w *readerWatch) anyHeld() bool {
	w.mu.Lock()
	defer w.mu.Unlock()
	for s := range w.sessions {
		if s.idle.Load() == 0 {
			return true
		}
	}
	return false
}

// addReader starts a reader and counts it in counter, unless limit run
// or stop has begun.
func (s *session) addReader(limit int32, counter *atomic.Uint64) {
	// spawnMu orders this against wakeAll: a reader is added only
	// before stopping is set, while the reader that is held has not
	// ended (readers end only once stopping is set, or while another
	// waits), so wg never goes from zero to one after serving ended.
	s.spawnMu.Lock()
	defer s.spawnMu.Unlock()
	if s.stopping.Load() {
		return
	}
	if s.readers.Add(1) > limit {
		s.readers.Add(-1)
		return
	}
	counter.Add(1)
	s.wg.Add(1)
	go s.reader()
}
