package fusefs

import (
	"crypto/sha256"
	"encoding/hex"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strings"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"
)

// The overlay oracle through real mounts: overlay/oracle_test.go runs
// random operations on an overlay and on a memfs copy of its lower through
// the vfs contract; here the same kind of program runs through system
// calls on a mounted overlay and on kernel tmpfs holding a copy of the
// lower, once per transport, and every result and the whole tree are
// compared. What it adds to the vfs oracle is the kernel and the transport
// between: a request answered from the wrong entry, a reply cut short or
// an error lost on the ring shows here as a difference from tmpfs.

// oraclePaths are the names the operations use: lower entries (see
// makeOverlayLower) and new ones, at several depths.
var oraclePaths = []string{
	"a", "a/f", "a/f2", "a/sub", "a/sub/g", "a/link", "top", "t", "t/x",
	"new", "a/new", "a/sub/new", "new/x", "b", "b/y",
}

// oracleErr names the errno in err, or "ok".
func oracleErr(err error) string {
	if err == nil {
		return "ok"
	}
	var errno syscall.Errno
	if errors.As(err, &errno) {
		return unix.ErrnoName(errno)
	}
	return err.Error()
}

// oracleStat describes what must match between the overlay and tmpfs of
// path's lstat: times, inode numbers, blocks and directory sizes differ
// by design.
func oracleStat(path string) string {
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		return oracleErr(err)
	}
	s := fmt.Sprintf("%o uid=%d gid=%d nlink=%d", st.Mode, st.Uid, st.Gid, st.Nlink)
	if st.Mode&unix.S_IFMT != unix.S_IFDIR {
		s += fmt.Sprintf(" size=%d", st.Size)
	}
	return s
}

// oraclePattern is n bytes made from seed.
func oraclePattern(n int, seed byte) []byte {
	b := make([]byte, n)
	for i := range b {
		b[i] = seed + byte(i*7)
	}
	return b
}

// oracleOp is one operation: its description, and a function that runs
// it under a root and describes the result.
type oracleOp struct {
	desc string
	run  func(root string) string
}

// randomOracleOp draws an operation.
func randomOracleOp(r *rand.Rand) oracleOp {
	path := func() string { return oraclePaths[r.IntN(len(oraclePaths))] }
	p, q := path(), path()
	switch r.IntN(17) {
	case 0:
		return oracleOp{"lstat " + p, func(root string) string { return oracleStat(filepath.Join(root, p)) }}
	case 1:
		off, n := r.Int64N(256)*2000, r.IntN(256)*600
		return oracleOp{fmt.Sprintf("read %s %d %d", p, off, n), func(root string) string {
			fd, err := unix.Open(filepath.Join(root, p), unix.O_RDONLY|unix.O_CLOEXEC, 0)
			if err != nil {
				return oracleErr(err)
			}
			defer unix.Close(fd)
			buf := make([]byte, n)
			got, err := unix.Pread(fd, buf, off)
			sum := sha256.Sum256(buf[:max(got, 0)])
			return fmt.Sprintf("%d %s %s", got, oracleErr(err), hex.EncodeToString(sum[:6]))
		}}
	case 2, 3:
		off, n, seed, trunc := r.Int64N(256)*1500, r.IntN(256)*50+1, byte(r.Uint32()), r.IntN(4) == 0
		return oracleOp{fmt.Sprintf("write %s %d %d trunc=%v", p, off, n, trunc), func(root string) string {
			flags := unix.O_RDWR | unix.O_CLOEXEC
			if trunc {
				flags |= unix.O_TRUNC
			}
			fd, err := unix.Open(filepath.Join(root, p), flags, 0)
			if err != nil {
				return oracleErr(err)
			}
			defer unix.Close(fd)
			got, err := unix.Pwrite(fd, oraclePattern(n, seed), off)
			return fmt.Sprintf("%d %s", got, oracleErr(err))
		}}
	case 4:
		size := r.Int64N(256) * 3000
		return oracleOp{fmt.Sprintf("truncate %s %d", p, size), func(root string) string {
			return oracleErr(unix.Truncate(filepath.Join(root, p), size))
		}}
	case 5:
		excl := r.IntN(2) == 0
		return oracleOp{fmt.Sprintf("create %s excl=%v", p, excl), func(root string) string {
			flags := unix.O_RDWR | unix.O_CREAT | unix.O_CLOEXEC
			if excl {
				flags |= unix.O_EXCL
			}
			fd, err := unix.Open(filepath.Join(root, p), flags, 0o640)
			if err != nil {
				return oracleErr(err)
			}
			unix.Close(fd)
			return oracleStat(filepath.Join(root, p))
		}}
	case 6:
		mode := uint32(r.IntN(0o1000)) | 0o700
		return oracleOp{fmt.Sprintf("mkdir %s %o", p, mode), func(root string) string {
			if err := unix.Mkdir(filepath.Join(root, p), mode); err != nil {
				return oracleErr(err)
			}
			return oracleStat(filepath.Join(root, p))
		}}
	case 7:
		return oracleOp{"unlink " + p, func(root string) string { return oracleErr(unix.Unlink(filepath.Join(root, p))) }}
	case 8:
		return oracleOp{"rmdir " + p, func(root string) string { return oracleErr(unix.Rmdir(filepath.Join(root, p))) }}
	case 9:
		flags := []uint{0, 0, unix.RENAME_NOREPLACE, unix.RENAME_EXCHANGE}[r.IntN(4)]
		return oracleOp{fmt.Sprintf("rename %s %s %d", p, q, flags), func(root string) string {
			return oracleErr(unix.Renameat2(unix.AT_FDCWD, filepath.Join(root, p), unix.AT_FDCWD, filepath.Join(root, q), flags))
		}}
	case 10:
		return oracleOp{fmt.Sprintf("link %s %s", p, q), func(root string) string {
			if err := unix.Link(filepath.Join(root, p), filepath.Join(root, q)); err != nil {
				return oracleErr(err)
			}
			return oracleStat(filepath.Join(root, q))
		}}
	case 11:
		// A relative target, so that it resolves the same under
		// both roots.
		target := strings.Repeat("../", strings.Count(p, "/")) + q
		return oracleOp{fmt.Sprintf("symlink %s -> %s", p, target), func(root string) string {
			return oracleErr(unix.Symlink(target, filepath.Join(root, p)))
		}}
	case 12:
		mode := uint32(r.IntN(0o10000))
		return oracleOp{fmt.Sprintf("chmod %s %o", p, mode), func(root string) string {
			if err := unix.Chmod(filepath.Join(root, p), mode); err != nil {
				return oracleErr(err)
			}
			return oracleStat(filepath.Join(root, p))
		}}
	case 13:
		uid := r.IntN(3) * 1000
		return oracleOp{fmt.Sprintf("lchown %s %d", p, uid), func(root string) string {
			if err := unix.Lchown(filepath.Join(root, p), uid, uid+1); err != nil {
				return oracleErr(err)
			}
			return oracleStat(filepath.Join(root, p))
		}}
	case 14:
		name, v, rm := fmt.Sprintf("user.x%d", r.IntN(3)), byte(r.Uint32()), r.IntN(4) == 0
		return oracleOp{fmt.Sprintf("xattr %s %s %d rm=%v", p, name, v, rm), func(root string) string {
			if rm {
				return oracleErr(unix.Lremovexattr(filepath.Join(root, p), name))
			}
			return oracleErr(unix.Lsetxattr(filepath.Join(root, p), name, []byte{v}, 0))
		}}
	case 15:
		return oracleOp{"readdir " + p, func(root string) string {
			ents, err := os.ReadDir(filepath.Join(root, p))
			if err != nil {
				return oracleErr(err)
			}
			var names []string
			for _, e := range ents {
				names = append(names, fmt.Sprintf("%s:%v", e.Name(), e.Type()))
			}
			return strings.Join(names, ",")
		}}
	default:
		off, n, punch := r.Int64N(256)*1000, r.Int64N(256)*300+1, r.IntN(2) == 0
		return oracleOp{fmt.Sprintf("fallocate %s %d %d punch=%v", p, off, n, punch), func(root string) string {
			fd, err := unix.Open(filepath.Join(root, p), unix.O_RDWR|unix.O_CLOEXEC, 0)
			if err != nil {
				return oracleErr(err)
			}
			defer unix.Close(fd)
			var mode uint32
			if punch {
				mode = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
			}
			return oracleErr(unix.Fallocate(fd, mode, off, n))
		}}
	}
}

// oracleTree describes every entry under root: its attributes, a
// symlink's target, a file's content and every entry's user xattrs.
func oracleTree(t *testing.T, root string) string {
	t.Helper()
	var lines []string
	err := filepath.WalkDir(root, func(path string, d os.DirEntry, err error) error {
		if err != nil {
			return err
		}
		rel, _ := filepath.Rel(root, path)
		line := rel + " " + oracleStat(path)
		switch {
		case d.Type()&os.ModeSymlink != 0:
			target, err := os.Readlink(path)
			line += " -> " + target + " " + oracleErr(err)
		case d.Type().IsRegular():
			b, err := os.ReadFile(path)
			sum := sha256.Sum256(b)
			line += " " + hex.EncodeToString(sum[:8]) + " " + oracleErr(err)
		}
		if d.Type()&os.ModeSymlink == 0 {
			buf := make([]byte, 4096)
			n, err := unix.Listxattr(path, buf)
			var names []string
			for _, x := range strings.Split(string(buf[:max(n, 0)]), "\x00") {
				if strings.HasPrefix(x, "user.") {
					v := make([]byte, 16)
					vn, _ := unix.Getxattr(path, x, v)
					names = append(names, fmt.Sprintf("%s=%x", x, v[:max(vn, 0)]))
				}
			}
			sort.Strings(names)
			line += " xattrs " + oracleErr(err) + " " + strings.Join(names, ",")
		}
		lines = append(lines, line)
		return nil
	})
	if err != nil {
		t.Fatalf("walking %s: %v", root, err)
	}
	return strings.Join(lines, "\n")
}

// runOverlayOracle runs seeded random programs of ops operations on an
// overlay mount with opts and on tmpfs, and fails at the first
// difference.
func runOverlayOracle(t *testing.T, opts Options, seeds []uint64, ops int) {
	for _, seed := range seeds {
		t.Run(fmt.Sprintf("seed=%d", seed), func(t *testing.T) {
			lower := makeOverlayLower(t)
			_, tl := newTestLayer(t, 64<<20)
			ref := filepath.Join(tl.Dir(), "ref")
			if out, err := exec.Command("cp", "-a", lower, ref).CombinedOutput(); err != nil {
				t.Fatalf("copying the lower to tmpfs: %v\n%s", err, out)
			}
			mnt, srv := testOverlayMountServer(t, lower, opts)
			if want := opts.Transport; want != TransportAuto && srv.Transport() != want {
				t.Fatalf("Transport() = %q, want %q", srv.Transport(), want)
			}
			r := rand.New(rand.NewPCG(seed, 13))
			var log []string
			for i := range ops {
				op := randomOracleOp(r)
				want, got := op.run(ref), op.run(mnt)
				log = append(log, fmt.Sprintf("%d %s: %s", i, op.desc, got))
				if got != want {
					t.Fatalf("%s: overlay %q, tmpfs %q; operations so far:\n%s", op.desc, got, want, strings.Join(log, "\n"))
				}
				if i%25 == 24 || i == ops-1 {
					if g, w := oracleTree(t, mnt), oracleTree(t, ref); g != w {
						t.Fatalf("after %d operations the trees differ:\noverlay:\n%s\ntmpfs:\n%s\noperations:\n%s", i+1, g, w, strings.Join(log, "\n"))
					}
				}
			}
		})
	}
}

// TestOverlayOracleMount runs the overlay oracle through a mount served
// over io_uring and over /dev/fuse, passthrough on and off.
func TestOverlayOracleMount(t *testing.T) {
	seeds, ops := []uint64{1, 2, 3, 4}, 1000
	if testing.Short() {
		seeds, ops = seeds[:1], 100
	}
	t.Run("io-uring", func(t *testing.T) {
		requireRing(t)
		runOverlayOracle(t, Options{Transport: TransportIOUring}, seeds, ops)
	})
	t.Run("io-uring-daemon-io", func(t *testing.T) {
		requireRing(t)
		runOverlayOracle(t, Options{Transport: TransportIOUring, DisablePassthrough: true}, seeds, ops)
	})
	t.Run("dev-fuse", func(t *testing.T) {
		requireFUSE(t)
		runOverlayOracle(t, Options{Transport: TransportDevFuse}, seeds, ops)
	})
}

// TestRingOverlayPosix runs posixtest on an overlay served over io_uring.
func TestRingOverlayPosix(t *testing.T) {
	requireRing(t)
	runOverlayPosix(t, Options{Transport: TransportIOUring})
}
