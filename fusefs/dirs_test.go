package fusefs

import (
	"encoding/binary"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// getdentsNames reads at most max bytes of directory entries from fd and
// returns their names, "." and ".." left out, and whether the directory
// ended.
func getdentsNames(t *testing.T, fd, max int) ([]string, bool) {
	t.Helper()
	buf := make([]byte, max)
	n, err := unix.Getdents(fd, buf)
	if err != nil {
		t.Fatal(err)
	}
	var names []string
	for b := buf[:n]; len(b) > 0; {
		reclen := int(binary.NativeEndian.Uint16(b[16:]))
		name := b[19:reclen]
		for i, c := range name {
			if c == 0 {
				name = name[:i]
				break
			}
		}
		if s := string(name); s != "." && s != ".." {
			names = append(names, s)
		}
		b = b[reclen:]
	}
	return names, n == 0
}

// TestReadDirWithoutOpenAcrossAdopt: directories are read without OPENDIR,
// by node id and offset. A directory read in part before a stop is read
// on by the successor, which never opened it nor looked it up, and every
// entry shows exactly once; a fresh mount sends one OPENDIR (answered
// ENOSYS) and no RELEASEDIR, ever.
func TestReadDirWithoutOpenAcrossAdopt(t *testing.T) {
	base, l := newTestLayer(t, 16<<20)
	mnt := filepath.Join(base, "mnt")
	os.Mkdir(mnt, 0o755)
	srv, err := Mount(mnt, l, Options{})
	if err != nil {
		t.Fatal(err)
	}
	const n = 600
	dir := filepath.Join(mnt, "d")
	os.Mkdir(dir, 0o755)
	for i := range n {
		if err := os.WriteFile(filepath.Join(dir, fmt.Sprintf("file-with-a-longish-name-%04d", i)), nil, 0o644); err != nil {
			t.Fatal(err)
		}
	}
	for range 3 {
		names, err := os.ReadDir(dir)
		if err != nil || len(names) != n {
			t.Fatalf("readdir: %d names, %v", len(names), err)
		}
	}
	// The kernel drops its cache of d when d changes: this one reads d
	// afresh, a page at a time, as the reader asks.
	os.WriteFile(filepath.Join(dir, "file-with-a-longish-name-last"), nil, 0o644)
	fd, err := unix.Open(dir, unix.O_RDONLY|unix.O_DIRECTORY, 0)
	if err != nil {
		t.Fatal(err)
	}
	seen := map[string]int{}
	first, _ := getdentsNames(t, fd, 1024)
	for _, s := range first {
		seen[s]++
	}
	if c := srv.RequestCounts(); c["OPENDIR"] != 1 || c["RELEASEDIR"] != 0 {
		t.Errorf("OPENDIR %d, RELEASEDIR %d; want 1, 0", c["OPENDIR"], c["RELEASEDIR"])
	}
	sess, err := srv.Stop()
	if err != nil {
		t.Fatal(err)
	}
	srv2, err := Adopt(mnt, sess, adoptLayer(t, l), Options{}, false)
	if err != nil {
		unix.Close(fd)
		t.Fatal(err)
	}
	defer func() {
		unix.Close(fd)
		if err := srv2.Unmount(); err != nil {
			t.Error(err)
		}
	}()
	for {
		names, end := getdentsNames(t, fd, 4096)
		if end {
			break
		}
		for _, s := range names {
			seen[s]++
		}
	}
	if len(seen) != n+1 {
		t.Errorf("%d names read across the adopt, want %d", len(seen), n+1)
	}
	for s, c := range seen {
		if c != 1 {
			t.Errorf("%s read %d times", s, c)
		}
	}
	if c := srv2.RequestCounts(); c["OPENDIR"] != 0 || c["READDIR"]+c["READDIRPLUS"] == 0 {
		t.Errorf("the successor served OPENDIR %d, READDIR %d, READDIRPLUS %d", c["OPENDIR"], c["READDIR"], c["READDIRPLUS"])
	}
	// Entries a successor answered in READDIRPLUS are known to it.
	if _, err := os.Stat(filepath.Join(dir, "file-with-a-longish-name-0599")); err != nil {
		t.Error(err)
	}
}
