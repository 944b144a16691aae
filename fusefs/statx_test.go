package fusefs

import (
	"os"
	"path/filepath"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// btime returns path's birth time, or false if statx reports none. With
// sync the kernel's cached attributes are not used.
func btime(t *testing.T, path string, sync bool) (time.Time, bool) {
	t.Helper()
	flags := unix.AT_SYMLINK_NOFOLLOW
	if sync {
		flags |= unix.AT_STATX_FORCE_SYNC
	}
	var stx unix.Statx_t
	if err := unix.Statx(unix.AT_FDCWD, path, flags, unix.STATX_BASIC_STATS|unix.STATX_BTIME, &stx); err != nil {
		t.Fatalf("statx %s: %v", path, err)
	}
	if stx.Mask&unix.STATX_BTIME == 0 {
		return time.Time{}, false
	}
	return time.Unix(stx.Btime.Sec, int64(stx.Btime.Nsec)), true
}

// TestBirthTime: files, directories and symlinks have a birth time, as on
// tmpfs (stat -c %w), set when they are made and kept by writes, renames
// and a takeover; an overlay file has the birth time of its copy-up, and
// none while it is still wholly in the lower layer.
func TestBirthTime(t *testing.T) {
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		before := time.Now().Add(-time.Second)
		f, d, s := filepath.Join(dir, "f"), filepath.Join(dir, "d"), filepath.Join(dir, "s")
		if err := os.WriteFile(f, []byte("x"), 0o644); err != nil {
			t.Fatal(err)
		}
		os.Mkdir(d, 0o755)
		os.Symlink("f", s)
		after := time.Now().Add(time.Second)
		born := map[string]time.Time{}
		for _, p := range []string{f, d, s} {
			bt, ok := btime(t, p, false)
			if !ok || bt.Before(before) || bt.After(after) {
				t.Errorf("%s: birth time %v (%v), want between %v and %v", filepath.Base(p), bt, ok, before, after)
			}
			born[p] = bt
		}
		time.Sleep(20 * time.Millisecond)
		os.WriteFile(f, []byte("more"), 0o644)
		os.Rename(f, f+"2")
		os.Rename(f+"2", f)
		v.takeover()
		for _, p := range []string{f, d, s} {
			if bt, ok := btime(t, p, true); !ok || !bt.Equal(born[p]) {
				t.Errorf("%s: birth time %v (%v) after writes, renames and a takeover; want %v", filepath.Base(p), bt, ok, born[p])
			}
		}
		if v != nil && v.kind.overlay {
			top := filepath.Join(v.mnt, "top")
			if bt, ok := btime(t, top, true); ok {
				t.Errorf("a lower file: birth time %v, want none", bt)
			}
			start := time.Now().Add(-time.Second)
			if err := os.Chmod(top, 0o600); err != nil {
				t.Fatal(err)
			}
			if bt, ok := btime(t, top, true); !ok || bt.Before(start) {
				t.Errorf("a lower file copied up: birth time %v (%v), want its copy-up's", bt, ok)
			}
		}
	})
}
