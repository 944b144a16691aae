package fusefs

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// mmapWrite maps path (or, for "fd:3", the descriptor 3 it was given)
// shared, stores 4 bytes, msyncs and unmaps. A child process does it: a
// page fault on a FUSE mount served by the same process can stall it,
// while the fault waits for a READ and the garbage collector for the
// faulting thread.
func mmapWrite(path string) error {
	fd := 3
	if path != "fd:3" {
		var err error
		if fd, err = unix.Open(path, unix.O_RDWR|unix.O_CLOEXEC, 0); err != nil {
			return err
		}
		defer unix.Close(fd)
	}
	m, err := unix.Mmap(fd, 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		return err
	}
	copy(m, "abcd")
	if err := unix.Msync(m, unix.MS_SYNC); err != nil {
		return err
	}
	return unix.Munmap(m)
}

// mmapWriteChild runs mmapWrite in a child process, on path or, if f is
// not nil, on f.
func mmapWriteChild(t *testing.T, path string, f *os.File) {
	t.Helper()
	cmd := exec.Command(helper(t), "-test.run=^$", path)
	if f != nil {
		cmd.ExtraFiles = []*os.File{f}
		cmd.Args[len(cmd.Args)-1] = "fd:3"
	}
	cmd.Env = append(os.Environ(), "FUSEFS_TEST_AS=mmap-write")
	out, err := cmd.Output()
	if err != nil || strings.TrimSpace(string(out)) != "0" {
		t.Fatalf("mmap write in a child: %v, errno %s", err, out)
	}
}

// TestMmapWriteTimes: a store into a shared mapping moves the file's
// modification and change times as on tmpfs, with passthrough too, where
// the kernel writes the backing file without telling the server; also
// through a descriptor opened before a takeover. A file nobody writes
// keeps its attributes cached: repeated stats and opens cost no
// attribute request.
func TestMmapWriteTimes(t *testing.T) {
	old := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		f := filepath.Join(dir, "f")
		if err := os.WriteFile(f, make([]byte, 4096), 0o644); err != nil {
			t.Fatal(err)
		}
		times := func(what string) {
			t.Helper()
			var st unix.Stat_t
			if err := unix.Stat(f, &st); err != nil {
				t.Fatal(err)
			}
			if st.Mtim.Sec <= old.Unix() || st.Ctim.Sec <= old.Unix() {
				t.Errorf("%s: mtime %v, ctime %v; want now", what, time.Unix(st.Mtim.Unix()), time.Unix(st.Ctim.Unix()))
			}
		}
		if err := os.Chtimes(f, old, old); err != nil {
			t.Fatal(err)
		}
		os.Stat(f) // the kernel caches the attributes
		mmapWriteChild(t, f, nil)
		times("after a shared mapping's store, msync, munmap and close")

		// The same through a descriptor opened before a takeover.
		w, err := os.OpenFile(f, os.O_RDWR, 0)
		if err != nil {
			t.Fatal(err)
		}
		v.takeover()
		if err := os.Chtimes(f, old, old); err != nil {
			t.Fatal(err)
		}
		os.Stat(f)
		mmapWriteChild(t, f, w)
		times("after a store through a descriptor opened before a takeover")
		w.Close()
		times("after its close")

		// Through the descriptor that created the file: CREATE's own
		// reply gives the writer's attributes (no invalidation notice).
		os.Remove(f)
		c, err := os.OpenFile(f, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if err := c.Truncate(4096); err != nil {
			t.Fatal(err)
		}
		if err := os.Chtimes(f, old, old); err != nil {
			t.Fatal(err)
		}
		os.Stat(f)
		mmapWriteChild(t, f, c)
		times("after a store through the creating descriptor")
		c.Close()

		// A created file keeps CREATE's attributes for long (it is empty:
		// nothing can be stored into a mapping of it) until a write(2)
		// through passthrough makes it longer; a store after that must
		// still move its times.
		os.Remove(f)
		c, err = os.OpenFile(f, os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := c.Write(make([]byte, 4096)); err != nil {
			t.Fatal(err)
		}
		var st unix.Stat_t
		if err := unix.Fstat(int(c.Fd()), &st); err != nil || st.Size != 4096 {
			t.Fatalf("after writing 4096 bytes: size %d, %v", st.Size, err)
		}
		written := st.Mtim
		time.Sleep(10 * time.Millisecond)
		mmapWriteChild(t, f, c)
		if err := unix.Stat(f, &st); err != nil {
			t.Fatal(err)
		}
		if st.Mtim == written {
			t.Errorf("a store into a file created and written through passthrough: mtime still %v", time.Unix(written.Unix()))
		}
		c.Close()

		if v == nil {
			return
		}
		// Creating a file sends no attribute request for it: the
		// permission check of the open uses CREATE's reply.
		before := v.ops.count("GETATTR") + v.ops.count("STATX")
		for i := 0; i < 10; i++ {
			c, err := os.OpenFile(filepath.Join(dir, fmt.Sprint("new", i)), os.O_RDWR|os.O_CREATE|os.O_EXCL, 0o644)
			if err != nil {
				t.Fatal(err)
			}
			c.Close()
		}
		// One GETATTR per create is the directory's: each create changed it.
		if n := v.ops.count("GETATTR") + v.ops.count("STATX") - before; n > 10 {
			t.Errorf("10 creates: %d attribute requests, want at most 10 (the directory's)", n)
		}
		// A file nobody writes: its attributes stay cached.
		g := filepath.Join(dir, "g")
		os.WriteFile(g, []byte("g"), 0o644)
		time.Sleep(50 * time.Millisecond) // its RELEASE
		os.Stat(g)
		before = v.ops.count("GETATTR") + v.ops.count("STATX")
		for i := 0; i < 20; i++ {
			os.Stat(g)
			if r, err := os.Open(g); err == nil {
				r.Close()
			}
		}
		if n := v.ops.count("GETATTR") + v.ops.count("STATX") - before; n > 0 {
			t.Errorf("20 stats and opens of a file nobody writes: %d attribute requests, want none", n)
		}
	})
}

// TestWriteOnlyAttributes: a write-only passthrough open, what tar and cp
// use, cannot be mapped, so the kernel sees each of its changes: a stat
// shows every write's size and times while it is open, and once it is
// closed the file's attributes stay cached (an open and a stat after an
// untar cost no attribute request).
func TestWriteOnlyAttributes(t *testing.T) {
	old := time.Date(2000, 1, 1, 0, 0, 0, 0, time.UTC)
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		f := filepath.Join(dir, "f")
		w, err := os.OpenFile(f, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o644)
		if err != nil {
			t.Fatal(err)
		}
		defer w.Close()
		stat := func() unix.Stat_t {
			t.Helper()
			var st unix.Stat_t
			if err := unix.Stat(f, &st); err != nil {
				t.Fatal(err)
			}
			return st
		}
		if _, err := w.Write(make([]byte, 1000)); err != nil {
			t.Fatal(err)
		}
		first := stat()
		if first.Size != 1000 {
			t.Errorf("after writing 1000 bytes: size %d", first.Size)
		}
		time.Sleep(10 * time.Millisecond)
		if _, err := w.WriteAt(make([]byte, 500), 1000); err != nil {
			t.Fatal(err)
		}
		if st := stat(); st.Size != 1500 || st.Mtim == first.Mtim || st.Ctim == first.Ctim {
			t.Errorf("after 500 bytes more: size %d, mtime %v, ctime %v; want 1500 and both moved from %v",
				st.Size, time.Unix(st.Mtim.Unix()), time.Unix(st.Ctim.Unix()), time.Unix(first.Mtim.Unix()))
		}
		// As tar ends a file: mode and times through the descriptor.
		if err := w.Chmod(0o600); err != nil {
			t.Fatal(err)
		}
		ts := []unix.Timespec{unix.NsecToTimespec(old.UnixNano()), unix.NsecToTimespec(old.UnixNano())}
		if err := unix.UtimesNanoAt(unix.AT_FDCWD, fmt.Sprintf("/proc/self/fd/%d", w.Fd()), ts, 0); err != nil {
			t.Fatal(err)
		}
		if err := w.Close(); err != nil {
			t.Fatal(err)
		}
		time.Sleep(50 * time.Millisecond) // its RELEASE
		want := func(st unix.Stat_t) {
			t.Helper()
			if st.Size != 1500 || st.Mode&0o7777 != 0o600 || st.Mtim.Sec != old.Unix() {
				t.Errorf("after close: size %d, mode %o, mtime %v; want 1500, 600, %v", st.Size, st.Mode&0o7777, time.Unix(st.Mtim.Unix()), old)
			}
		}
		if v == nil {
			want(stat())
			return
		}
		before := v.ops.count("GETATTR") + v.ops.count("STATX")
		for i := 0; i < 20; i++ {
			r, err := os.Open(f)
			if err != nil {
				t.Fatal(err)
			}
			r.Close()
			want(stat())
		}
		if n := v.ops.count("GETATTR") + v.ops.count("STATX") - before; n > 0 {
			t.Errorf("20 opens and stats of a file its write-only writer closed: %d attribute requests, want none", n)
		}
	})
}
