package fusefs

import (
	"encoding/binary"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Inode flags (linux/fs.h).
const (
	flImmutable = 0x10
	flAppend    = 0x20
	flNodump    = 0x40
	flNoatime   = 0x80
	flCompr     = 0x04
)

// withFile runs fn on a read-only descriptor of path.
func withFile(path string, fn func(fd int) error) error {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_NONBLOCK|unix.O_CLOEXEC, 0)
	if err != nil {
		return err
	}
	defer unix.Close(fd)
	return fn(fd)
}

func getFlags(path string) (uint32, error) {
	var flags uint32
	err := withFile(path, func(fd int) error {
		v, err := unix.IoctlGetUint32(fd, unix.FS_IOC_GETFLAGS)
		flags = v
		return err
	})
	return flags, err
}

func setFlags(path string, flags uint32) error {
	return withFile(path, func(fd int) error {
		return unix.IoctlSetPointerInt(fd, unix.FS_IOC_SETFLAGS, int(flags))
	})
}

// fsxattr gets (set false) or sets path's fsx_xflags.
func fsxattr(path string, set bool, xflags uint32) (uint32, error) {
	var buf [28]byte
	binary.LittleEndian.PutUint32(buf[:], xflags)
	err := withFile(path, func(fd int) error {
		cmd := uintptr(iocFsGetXattr)
		if set {
			cmd = iocFsSetXattr
		}
		if _, _, errno := unix.Syscall(unix.SYS_IOCTL, uintptr(fd), cmd, uintptr(unsafe.Pointer(&buf[0]))); errno != 0 {
			return errno
		}
		return nil
	})
	return binary.LittleEndian.Uint32(buf[:]), err
}

// errnoOf returns err's errno, 0 for nil.
func errnoOf(err error) syscall.Errno {
	var errno syscall.Errno
	if err != nil && !errors.As(err, &errno) {
		return syscall.Errno(0xffff)
	}
	return errno
}

// TestInodeFlags: chattr and lsattr work as on tmpfs (FS_IOC_GETFLAGS,
// SETFLAGS, FSGETXATTR, FSSETXATTR), the immutable and append-only flags
// refuse what Linux refuses, with the same errnos as tmpfs, on files and
// directories, and the flags survive a takeover. On an overlay, a lower
// file's flags are set on its copy-up.
func TestInodeFlags(t *testing.T) {
	var oracle []string
	eachParity(t, func(t *testing.T, dir string, v *parityVolume) {
		var got []string
		step := func(what string, err error) {
			got = append(got, fmt.Sprintf("%s: %v", what, errnoOf(err)))
		}
		p := func(name string) string { return filepath.Join(dir, name) }
		os.WriteFile(p("f"), []byte("data"), 0o644)
		os.WriteFile(p("other"), []byte("other"), 0o644)
		os.Mkdir(p("d"), 0o755)
		os.WriteFile(p("d/in"), nil, 0o644)

		flags, err := getFlags(p("f"))
		step(fmt.Sprintf("lsattr f %#x", flags), err)
		step("chattr +i f", setFlags(p("f"), flImmutable))
		immutableOps := func(when string) {
			flags, err := getFlags(p("f"))
			step(when+fmt.Sprintf("lsattr f %#x", flags), err)
			_, err = os.OpenFile(p("f"), os.O_WRONLY, 0)
			step(when+"open f for writing", err)
			_, err = os.OpenFile(p("f"), os.O_WRONLY|os.O_APPEND, 0)
			step(when+"open f for appending", err)
			step(when+"truncate f", os.Truncate(p("f"), 0))
			step(when+"chmod f", os.Chmod(p("f"), 0o600))
			step(when+"chown f", os.Chown(p("f"), 1, 1))
			step(when+"utimes f", unix.UtimesNano(p("f"), []unix.Timespec{{Sec: 1}, {Sec: 1}}))
			step(when+"touch f", unix.UtimesNano(p("f"), []unix.Timespec{{Nsec: unix.UTIME_NOW}, {Nsec: unix.UTIME_NOW}}))
			step(when+"setxattr f", unix.Setxattr(p("f"), "user.x", []byte("1"), 0))
			step(when+"unlink f", os.Remove(p("f")))
			step(when+"rename f", os.Rename(p("f"), p("g")))
			step(when+"rename onto f", os.Rename(p("other"), p("f")))
			step(when+"link f", os.Link(p("f"), p("h")))
			data, err := os.ReadFile(p("f"))
			step(when+"read f "+string(data), err)
		}
		immutableOps("")
		v.takeover()
		immutableOps("after a takeover: ")
		step("chattr -i f", setFlags(p("f"), 0))
		ctimeMoves := func(what string, change func() error) {
			var before, after unix.Stat_t
			unix.Stat(p("f"), &before) // the kernel holds the attributes now
			err := change()
			unix.Stat(p("f"), &after)
			step(fmt.Sprintf("%s: ctime moved %v", what, after.Ctim != before.Ctim), err)
		}
		ctimeMoves("chattr +d f", func() error { return setFlags(p("f"), flNodump) })
		ctimeMoves("FSSETXATTR nodump f", func() error { _, err := fsxattr(p("f"), true, 0x80); return err })
		step("chattr +c f", setFlags(p("f"), flCompr))
		step("chattr +dA f", setFlags(p("f"), flNodump|flNoatime))
		flags, err = getFlags(p("f"))
		step(fmt.Sprintf("lsattr f %#x", flags), err)

		step("chattr +a f", setFlags(p("f"), flAppend))
		_, err = os.OpenFile(p("f"), os.O_WRONLY, 0)
		step("open +a f for writing", err)
		_, err = os.OpenFile(p("f"), os.O_RDWR|os.O_TRUNC|os.O_APPEND, 0)
		step("open +a f with O_TRUNC", err)
		if w, err := os.OpenFile(p("f"), os.O_WRONLY|os.O_APPEND, 0); err != nil {
			step("open +a f for appending", err)
		} else {
			_, err := w.Write([]byte("+more"))
			step("append to +a f", err)
			step("ftruncate +a f", w.Truncate(1))
			w.Close()
		}
		step("unlink +a f", os.Remove(p("f")))
		data, err := os.ReadFile(p("f"))
		step("read +a f "+string(data), err)

		xflags, err := fsxattr(p("f"), false, 0)
		step(fmt.Sprintf("FSGETXATTR +a f %#x", xflags), err)
		_, err = fsxattr(p("f"), true, 0x8) // FS_XFLAG_IMMUTABLE
		step("FSSETXATTR immutable f", err)
		flags, err = getFlags(p("f"))
		step(fmt.Sprintf("lsattr f %#x", flags), err)
		step("chattr = f", setFlags(p("f"), 0))

		// Directories.
		step("chattr +a d", setFlags(p("d"), flAppend))
		step("create in +a d", os.WriteFile(p("d/new"), nil, 0o644))
		step("unlink in +a d", os.Remove(p("d/in")))
		step("chattr +i d", setFlags(p("d"), flImmutable))
		step("create in +i d", os.WriteFile(p("d/new2"), nil, 0o644))
		step("rmdir +i d", os.Remove(p("d")))
		step("chattr = d", setFlags(p("d"), 0))

		// Changing i or a needs CAP_LINUX_IMMUTABLE, even for the owner.
		os.WriteFile(p("mine"), nil, 0o644)
		os.Chown(p("mine"), 1000, 1000)
		step("chattr +i as its unprivileged owner", asUser(t, "set-immutable", p("mine")))
		step("chattr +d as its unprivileged owner", asUser(t, "set-nodump", p("mine")))

		if oracle == nil {
			oracle = got
			t.Logf("tmpfs:\n%s", strings.Join(got, "\n"))
			return
		}
		if g, w := strings.Join(got, "\n"), strings.Join(oracle, "\n"); g != w {
			t.Errorf("differs from tmpfs:\n%s", lineDiff(g, w))
		}

		if v.kind.overlay {
			overlayFlags(t, v)
		}
	})
}

// overlayFlags: a lower file's flags are set on its copy-up; an
// append-only one is copied whole and appends after the lower bytes.
func overlayFlags(t *testing.T, v *parityVolume) {
	top := filepath.Join(v.mnt, "top")
	if flags, err := getFlags(top); err != nil || flags != 0 {
		t.Errorf("lsattr of a lower file: %#x, %v", flags, err)
	}
	if err := setFlags(top, flImmutable); err != nil {
		t.Fatalf("chattr +i of a lower file: %v", err)
	}
	if _, err := os.OpenFile(top, os.O_WRONLY, 0); !errors.Is(err, syscall.EPERM) {
		t.Errorf("write open of an immutable lower file: %v, want EPERM", err)
	}
	setFlags(top, 0)
	big := filepath.Join(v.mnt, "a/sub/g")
	want, _ := os.ReadFile(filepath.Join(v.lower, "a/sub/g"))
	if err := setFlags(big, flAppend); err != nil {
		t.Fatalf("chattr +a of a big lower file: %v", err)
	}
	w, err := os.OpenFile(big, os.O_WRONLY|os.O_APPEND, 0)
	if err != nil {
		t.Fatalf("append open of an append-only lower file: %v", err)
	}
	w.Write([]byte("+tail"))
	w.Close()
	if got, _ := os.ReadFile(big); string(got) != string(want)+"+tail" {
		t.Errorf("append-only lower file after an append: %d bytes, want %d", len(got), len(want)+5)
	}
	setFlags(big, 0)
}

// lineDiff shows the lines of got and want that differ.
func lineDiff(got, want string) string {
	g, w := strings.Split(got, "\n"), strings.Split(want, "\n")
	var b strings.Builder
	for i := 0; i < max(len(g), len(w)); i++ {
		var gl, wl string
		if i < len(g) {
			gl = g[i]
		}
		if i < len(w) {
			wl = w[i]
		}
		if gl != wl {
			fmt.Fprintf(&b, "got  %s\nwant %s\n", gl, wl)
		}
	}
	return b.String()
}
