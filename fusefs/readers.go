package fusefs

import (
	"runtime"
	"sync"
	"sync/atomic"
	"time"
)

// How many readers a session runs. One reader serves a connection's
// requests one after another while they are quick. The process's watch
// looks at the sessions now and then (every tick, from minTick while a
// reader is seen in a request to maxTick while none is) and adds a helper
// reader where:
//   - one request has held every reader for the tick (stuck): up to
//     maxReaders, so a slow request (a copy-up, a large write through the
//     daemon) holds up only its caller;
//   - requests of more than one caller kept every reader busy for the
//     whole tick, at least saturatedTakes of them and no reader finding
//     the queue empty (saturated): up to saturatedReaders. One caller
//     alone never counts: it waits for each answer, so a second reader
//     would only take turns with the first.
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

// minTick and maxTick bound the watch's tick. A look that finds a reader
// in a request makes the next tick minTick, one that finds none doubles
// it up to maxTick: a request that holds a reader gets a helper after
// minTick to maxTick plus minTick, and a volume that sends a request now
// and then costs the watch about one wake-up per maxTick. With a
// request every 5 ms, a 1 ms tick throughout cost the daemon 5,600-6,100
// context switches a second and 6-8% of a CPU, against 800 and 1.5%
// before the watch; this backoff, 830-870 and 1.1-1.2%.
const (
	minTick = time.Millisecond
	maxTick = 32 * time.Millisecond
)

// saturatedTakes is how many requests a saturated session has taken
// between two looks, with at least two changes of caller among them. A
// quick request takes 20-30 us, so a saturated session takes dozens a
// tick.
const saturatedTakes = 4

// sleepAfter is how long the watch goes on ticking with no request taken
// before it sleeps until the next request.
const sleepAfter = 100 * time.Millisecond

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
type progress struct{ taken, waits, callerChanges uint64 }

// progressOf reads s's counts.
func progressOf(s *session) progress {
	return progress{taken: s.taken.Load(), waits: s.waits.Load(), callerChanges: s.callerChanges.Load()}
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
	timer := time.NewTimer(maxTick)
	timer.Stop()
	for range w.kick {
		tick := minTick
		for quiet := time.Duration(0); quiet < sleepAfter; {
			timer.Reset(tick)
			<-timer.C
			took, held := w.look()
			if held {
				tick = minTick
			} else {
				tick = min(2*tick, maxTick)
			}
			if took || held {
				quiet = 0
				continue
			}
			if quiet += tick; quiet >= sleepAfter {
				w.asleep.Store(true)
				if w.anyHeld() && w.asleep.CompareAndSwap(true, false) {
					// A request was taken meanwhile, whose reader may
					// have found the watch still awake: go on.
					quiet, tick = 0, minTick
				}
			}
		}
	}
}

// look starts a helper reader for each stuck or saturated session. It
// says whether any session took a request since the last look, and
// whether any has every reader in one.
func (w *readerWatch) look() (took, held bool) {
	w.mu.Lock()
	defer w.mu.Unlock()
	for s, last := range w.sessions {
		now := progressOf(s)
		busy := s.idle.Load() == 0
		took = took || now.taken != last.taken
		held = held || busy
		switch {
		case busy && now.taken == last.taken:
			// Stuck: one request has held every reader since the last
			// look.
			s.addReader(maxReaders, &s.stuckHelpers)
		case busy && now.waits == last.waits && now.taken-last.taken >= saturatedTakes &&
			now.callerChanges-last.callerChanges >= 2:
			// Saturated: requests of several callers kept every
			// reader busy since the last look.
			s.addReader(saturatedReaders(), &s.saturatedHelpers)
		}
		w.sessions[s] = now
	}
	return took, held
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
