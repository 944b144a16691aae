package fusefs

import (
	"fmt"
	"maps"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"
)

// countsTree makes a lower tree of dirs directories of files files each
// (the bench's tree shape in small), and returns its root and its number
// of files and directories.
func countsTree(t testing.TB, dirs, files int) (root string, nfiles, ndirs int) {
	t.Helper()
	root = t.TempDir()
	for d := range dirs {
		dir := filepath.Join(root, fmt.Sprintf("d%02d", d))
		if err := os.MkdirAll(filepath.Join(dir, "sub"), 0o755); err != nil {
			t.Fatal(err)
		}
		for f := range files {
			p := filepath.Join(dir, fmt.Sprintf("f%03d", f))
			if f%2 == 1 {
				p = filepath.Join(dir, "sub", fmt.Sprintf("f%03d", f))
			}
			if err := os.WriteFile(p, []byte(strings.Repeat("x", 100+f)), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	return root, dirs * files, 1 + 2*dirs
}

// countsDelta runs the shell command cmd in dir and returns the FUSE
// requests it cost the server, by operation.
func countsDelta(t testing.TB, srv *Server, dir, cmd string) map[string]uint64 {
	t.Helper()
	before := srv.RequestCounts()
	c := exec.Command("sh", "-c", cmd)
	c.Dir = dir
	if out, err := c.CombinedOutput(); err != nil {
		t.Fatalf("%s: %v\n%s", cmd, err, out)
	}
	after := srv.RequestCounts()
	d := map[string]uint64{}
	for op, v := range after {
		if v > before[op] {
			d[op] = v - before[op]
		}
	}
	// FORGET and BATCH_FORGET come when the kernel pleases (memory
	// pressure, unmount): not the workload's.
	delete(d, "FORGET")
	delete(d, "BATCH_FORGET")
	return d
}

func fmtCounts(m map[string]uint64) string {
	var b strings.Builder
	for _, op := range slices.Sorted(maps.Keys(m)) {
		fmt.Fprintf(&b, "%s=%d ", op, m[op])
	}
	return strings.TrimSpace(b.String())
}

func total(m map[string]uint64) (n uint64) {
	for _, v := range m {
		n += v
	}
	return n
}

// TestRequestCounts pins the FUSE requests that a walk of a lower tree
// costs on an overlay mount: `find | xargs cat` cold and warm and `ls
// -lR` cold and warm, each op counted exactly. The counts are the
// kernel's and ours together, so a change of either that sends more
// requests fails here.
func TestRequestCounts(t *testing.T) {
	requireFUSE(t)
	lower, nfiles, ndirs := countsTree(t, 10, 20)
	entries := nfiles + ndirs - 1
	// want is per workload: the expected counts, with n standing for the
	// number of files (find+cat) or entries (ls).
	type workload struct {
		name, cmd string
		per       int
		want      map[string]uint64
	}
	cat := "find . -type f -print0 | xargs -0 cat >/dev/null"
	ls := "ls -lR >/dev/null"
	for _, run := range [][]workload{
		{
			{"find+cat cold", cat, nfiles, wantCounts["find+cat cold"]},
			{"find+cat warm", cat, nfiles, wantCounts["find+cat warm"]},
		},
		{
			{"ls -lR cold", ls, entries, wantCounts["ls -lR cold"]},
			{"ls -lR warm", ls, entries, wantCounts["ls -lR warm"]},
		},
	} {
		mnt, srv := testOverlayMountServer(t, lower, Options{})
		// The mount's own probe (pollHack) is released asynchronously.
		for deadline := time.Now().Add(5 * time.Second); srv.RequestCounts()["RELEASE"] == 0 && time.Now().Before(deadline); {
			time.Sleep(time.Millisecond)
		}
		for _, w := range run {
			got := countsDelta(t, srv, mnt, w.cmd)
			t.Logf("%s: %.2f requests per file or entry: %s", w.name, float64(total(got))/float64(w.per), fmtCounts(got))
			if w.want != nil && !maps.Equal(got, w.want) {
				t.Errorf("%s: got %s, want %s", w.name, fmtCounts(got), fmtCounts(w.want))
			}
		}
	}
}

// wantCounts are TestRequestCounts's expected counts for its tree of 200
// files in 21 directories (221 entries below the root), with
// passthrough. Per file: find+cat pays OPEN and RELEASE, and warm a
// GETATTR too (a passthrough read makes the kernel drop the cached atime;
// only a read-only superblock spares it); one READDIRPLUS per directory
// spares every LOOKUP; a directory costs no OPENDIR and RELEASEDIR but the
// first, answered ENOSYS; ls -l's look-ups of security.selinux and
// system.posix_acl_access are answered EOPNOTSUPP once, and ls stops
// asking. The warm ls's GETATTRs are the directories' atimes, dropped by
// the cold ls's READDIRs.
var wantCounts = map[string]map[string]uint64{
	"find+cat cold": {"FLUSH": 1, "OPEN": 200, "OPENDIR": 1, "READDIR": 21, "READDIRPLUS": 21, "RELEASE": 200, "STATFS": 1},
	"find+cat warm": {"GETATTR": 221, "OPEN": 200, "RELEASE": 200, "STATFS": 1},
	"ls -lR cold":   {"GETXATTR": 2, "OPENDIR": 1, "READDIRPLUS": 42},
	"ls -lR warm":   {"GETATTR": 21, "GETXATTR": 2},
}
