package fusefs

import (
	"encoding/binary"
	"os"
	"path/filepath"
	"strconv"
	"testing"
	"time"

	"golang.org/x/sys/unix"
)

// exportHandle is a file handle a test took, and what it must open.
type exportHandle struct {
	name string
	h    unix.FileHandle
	ino  uint64
	// data is the file's content, or "" for a directory.
	data string
	dir  bool
}

// dropCaches makes the kernel forget every inode nobody uses (FUSE sends
// FORGET for them).
func dropCaches(t *testing.T) {
	t.Helper()
	if err := os.WriteFile("/proc/sys/vm/drop_caches", []byte("3"), 0); err != nil {
		t.Fatal(err)
	}
}

// takeHandle returns the handle of name in dir.
func takeHandle(t *testing.T, dir, name, data string) exportHandle {
	t.Helper()
	p := filepath.Join(dir, name)
	h, _, err := unix.NameToHandleAt(unix.AT_FDCWD, p, 0)
	if err != nil {
		t.Fatalf("name_to_handle_at %s: %v", name, err)
	}
	var st unix.Stat_t
	if err := unix.Lstat(p, &st); err != nil {
		t.Fatal(err)
	}
	return exportHandle{name: name, h: h, ino: st.Ino, data: data, dir: st.Mode&unix.S_IFMT == unix.S_IFDIR}
}

// openHandle is open_by_handle_at(2) of h on the mount whose root is root.
func openHandle(root string, h unix.FileHandle, flags int) (int, error) {
	mfd, err := unix.Open(root, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_CLOEXEC, 0)
	if err != nil {
		return -1, err
	}
	defer unix.Close(mfd)
	return unix.OpenByHandleAt(mfd, h, flags|unix.O_CLOEXEC)
}

// checkHandle opens e by its handle and checks that it is the same inode,
// with its content, or for a directory at its path.
func checkHandle(t *testing.T, root, dir string, e exportHandle) {
	t.Helper()
	flags := unix.O_RDONLY
	if e.dir {
		flags |= unix.O_DIRECTORY
	}
	fd, err := openHandle(root, e.h, flags)
	if err != nil {
		t.Errorf("open_by_handle_at %s: %v", e.name, err)
		return
	}
	f := os.NewFile(uintptr(fd), e.name)
	defer f.Close()
	var st unix.Stat_t
	if err := unix.Fstat(fd, &st); err != nil || st.Ino != e.ino {
		t.Errorf("%s by handle: inode %d (%v), want %d", e.name, st.Ino, err, e.ino)
	}
	if e.dir {
		// A directory is reconnected to its place (LOOKUP of "..").
		p, err := os.Readlink("/proc/self/fd/" + strconv.Itoa(fd))
		if want := filepath.Join(dir, e.name); err != nil || p != want {
			t.Errorf("%s by handle is at %q (%v), want %q", e.name, p, err, want)
		}
		return
	}
	b := make([]byte, 64)
	n, _ := f.Read(b)
	if string(b[:n]) != e.data {
		t.Errorf("%s by handle reads %q, want %q", e.name, b[:n], e.data)
	}
}

// TestExportHandles: file handles of files and directories still open
// after the kernel forgot their inodes, and across a takeover; a handle
// of a removed file, or with another generation, is ESTALE; as on tmpfs.
// On an overlay, files of the lower, copied up and made in the upper.
func TestExportHandles(t *testing.T) {
	requireFUSE(t)
	build := func(t *testing.T, dir string) {
		for name, data := range map[string]string{"lower": "lower", "cu": "cu", "rmlower": "x", "d/e/f": "f"} {
			if err := os.MkdirAll(filepath.Dir(filepath.Join(dir, name)), 0o755); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(filepath.Join(dir, name), []byte(data), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
	eachParityTree(t, build, func(t *testing.T, dir string, v *parityVolume) {
		root := filepath.Dir(dir)
		for _, name := range []string{"new", "rmnew"} {
			if err := os.WriteFile(filepath.Join(dir, name), []byte(name), 0o644); err != nil {
				t.Fatal(err)
			}
		}
		live := []exportHandle{
			takeHandle(t, dir, "lower", "lower"),
			takeHandle(t, dir, "new", "new"),
			takeHandle(t, dir, "cu", "cu+"),
			takeHandle(t, dir, "d", ""),
			takeHandle(t, dir, "d/e", ""),
			takeHandle(t, dir, "d/e/f", "f"),
		}
		removed := []exportHandle{takeHandle(t, dir, "rmlower", ""), takeHandle(t, dir, "rmnew", "")}
		// Another generation of the same inode number.
		other := takeHandle(t, dir, "new", "")
		b := other.h.Bytes()
		genAt := 0 // tmpfs: {generation, inode number}
		if other.h.Type() == 0x81 {
			genAt = 8 // FUSE: {node id, generation}
		}
		binary.LittleEndian.PutUint32(b[genAt:], binary.LittleEndian.Uint32(b[genAt:])+1)
		removed = append(removed, exportHandle{name: "new of another generation", h: unix.NewFileHandle(other.h.Type(), b)})

		f, err := os.OpenFile(filepath.Join(dir, "cu"), os.O_WRONLY|os.O_APPEND, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteString("+"); err != nil {
			t.Fatal(err)
		}
		f.Close()
		for _, name := range []string{"rmlower", "rmnew"} {
			if err := os.Remove(filepath.Join(dir, name)); err != nil {
				t.Fatal(err)
			}
		}

		check := func(t *testing.T) {
			lookups := 0
			if v != nil {
				lookups = v.ops.count("LOOKUP")
			}
			for _, e := range live {
				checkHandle(t, root, dir, e)
			}
			for _, e := range removed {
				if fd, err := openHandle(root, e.h, unix.O_RDONLY); err != unix.ESTALE {
					t.Errorf("open_by_handle_at %s: fd %d, %v; want ESTALE", e.name, fd, err)
					if err == nil {
						unix.Close(fd)
					}
				}
			}
			if v != nil && v.ops.count("LOOKUP") == lookups {
				t.Errorf("no LOOKUP: the kernel had forgotten no inode")
			}
		}
		// forget drops the kernel's caches and waits until the server
		// has forgotten "new" (a memfs inode on both kinds of volume).
		forget := func() {
			dropCaches(t)
			if v == nil {
				return
			}
			deadline := time.Now().Add(5 * time.Second)
			for v.l.Refs(live[1].ino) != 0 && time.Now().Before(deadline) {
				time.Sleep(10 * time.Millisecond)
			}
			if n := v.l.Refs(live[1].ino); n != 0 {
				t.Fatalf("new still has %d references after drop_caches", n)
			}
		}
		forget()
		t.Run("forgotten", check)
		// The predecessor forgets, the successor serves the handles.
		forget()
		v.takeover()
		t.Run("after-takeover", check)
		// A successor gets the FORGETs of its predecessor's lookups
		// while it finds the inodes again.
		v.takeover()
		dropCaches(t)
		t.Run("forgotten-after-takeover", check)
	})
}
