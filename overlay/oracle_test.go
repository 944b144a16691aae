package overlay

import (
	"bytes"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/memfs"
	"github.com/csi-memfs/csi-memfs/vfs"
)

// tfs is what the oracle test drives: the overlay or the memfs oracle.
// tfs is a file system under test, the overlay or the memfs oracle, held
// through the contract fusefs serves. opts are the OpenOptions its opens
// use; step is how many entries each ReadDir call takes (0: all at once).
type tfs struct {
	vfs.FS
	opts vfs.OpenOptions
	step int
}

// overlayT tests an overlay as fusefs uses it: Direct opens, and readdir in
// small steps to exercise offsets.
func overlayT(fs *FS) tfs { return tfs{FS: fs, opts: vfs.OpenOptions{Direct: true}, step: 3} }

// layerT tests a memfs Layer, the oracle.
func layerT(l *memfs.Layer) tfs { return tfs{FS: l} }

// readDir returns the entries of the directory ino.
func (s tfs) readDir(ino uint64) ([]vfs.DirEntry, error) {
	d, err := s.OpenDir(ino)
	if err != nil {
		return nil, err
	}
	defer d.Close()
	var out []vfs.DirEntry
	if s.step == 0 {
		err = d.ReadDir(0, func(e *vfs.DirEntry) bool {
			out = append(out, *e)
			return true
		})
		return out, err
	}
	off := int64(0)
	for {
		got := 0
		err := d.ReadDir(off, func(e *vfs.DirEntry) bool {
			out = append(out, *e)
			off = e.Off
			got++
			return got < s.step
		})
		if err != nil {
			return nil, err
		}
		if got == 0 {
			return out, nil
		}
	}
}

// paths are the names the random operations use: lower entries and new
// ones, at several depths.
var paths = []string{
	"a", "a/f1", "a/big", "a/sub", "a/sub/g", "a/sub/deep", "a/sub/deep/x",
	"a/link", "a/hl", "b", "b/hl", "c", "top", "fifo", "empty", "e", "e/f",
	"e/f/y", "new", "a/new", "c/new", "b/new", "a/sub/new", "new/x", "c/x",
	"a/escape", "e/g", "n2",
}

// testStart divides the lower's old times from the times tests set.
var testStart = time.Now().Add(-time.Minute)

// oracle runs the same operations on an overlay and on a memfs holding a
// copy of its lower, and compares.
type oracle struct {
	t      testing.TB
	ov, or tfs
	fs     *FS
	log    []string
	// inos pairs overlay inode numbers with the oracle's: it must stay a
	// bijection (inode numbers are stable; hard links share one).
	inos, back map[uint64]uint64
}

var lowerOnce sync.Once
var sharedLower string

func newOracle(t testing.TB, lowerDir string) *oracle {
	fs := newOverlay(t, lowerDir)
	ol := newLayer(t)
	copyToLayer(t, lowerDir, ol)
	return &oracle{t: t, ov: overlayT(fs), or: layerT(ol), fs: fs, inos: map[uint64]uint64{}, back: map[uint64]uint64{}}
}

// resolve walks path from the root; the result holds one reference.
func resolve(s tfs, path string) (uint64, error) {
	ino := vfs.RootIno
	if path == "" {
		return ino, nil
	}
	for _, c := range strings.Split(path, "/") {
		e, err := s.Lookup(ino, c)
		if ino != vfs.RootIno {
			s.Forget(ino, 1)
		}
		if err != nil {
			return 0, err
		}
		ino = e.Ino()
	}
	return ino, nil
}

func split(path string) (string, string) {
	i := strings.LastIndexByte(path, '/')
	if i < 0 {
		return "", path
	}
	return path[:i], path[i+1:]
}

// op is one operation, as run on one file system; it returns a description
// of every result.
type op struct {
	name string
	run  func(s tfs) string
}

// onPath runs fn with path's inode.
func onPath(s tfs, path string, fn func(ino uint64) string) string {
	ino, err := resolve(s, path)
	if err != nil {
		return "resolve:" + errStr(err)
	}
	defer func() {
		if ino != vfs.RootIno {
			s.Forget(ino, 1)
		}
	}()
	return fn(ino)
}

func statStr(st unix.Stat_t) string {
	mt := "new"
	if st.Mtim.Nano() < testStart.UnixNano() {
		mt = fmt.Sprint(st.Mtim.Nano())
	}
	size := st.Size
	if st.Mode&unix.S_IFMT == unix.S_IFDIR {
		size = 0
	}
	return fmt.Sprintf("mode=%o uid=%d gid=%d nlink=%d size=%d rdev=%d mtime=%s", st.Mode, st.Uid, st.Gid, st.Nlink, size, st.Rdev, mt)
}

func entryStr(e vfs.Entry, err error) string {
	if err != nil {
		return errStr(err)
	}
	return "ok " + statStr(e.Stat)
}

// decode turns fuzz bytes into operations on paths.
func decode(prog []byte) []op { return decodeOn(prog, paths) }

// decodeOn turns fuzz bytes into operations on the paths names.
func decodeOn(prog []byte, names []string) []op {
	var ops []op
	next := func() byte {
		if len(prog) == 0 {
			return 0
		}
		b := prog[0]
		prog = prog[1:]
		return b
	}
	path := func() string { return names[int(next())%len(names)] }
	for len(prog) > 0 {
		kind := next() % 24
		switch kind {
		case 0:
			p := path()
			ops = append(ops, op{"stat " + p, func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					st, err := s.GetAttr(ino)
					if err != nil {
						return errStr(err)
					}
					return statStr(st)
				})
			}})
		case 1:
			p, off, n := path(), int64(next())*2000, int(next())*600
			ops = append(ops, op{fmt.Sprintf("read %s %d %d", p, off, n), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					f, err := s.Open(ino, unix.O_RDONLY, s.opts)
					if err != nil {
						return errStr(err)
					}
					defer f.Release()
					buf := make([]byte, n)
					got, err := f.ReadAt(buf, off)
					sum := sha256.Sum256(buf[:got])
					return fmt.Sprintf("%d %s %s", got, errStr(err), hex.EncodeToString(sum[:6]))
				})
			}})
		case 2, 3:
			p, off, n, seed := path(), int64(next())*1500, int(next())*50+1, next()
			trunc := kind == 3 && seed&1 == 1
			ops = append(ops, op{fmt.Sprintf("write %s %d %d trunc=%v", p, off, n, trunc), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					flags := unix.O_RDWR
					if trunc {
						flags |= unix.O_TRUNC
					}
					f, err := s.Open(ino, flags, s.opts)
					if err != nil {
						return errStr(err)
					}
					defer f.Release()
					got, err := f.WriteAt(pattern(n, seed), off, false)
					return fmt.Sprintf("%d %s", got, errStr(err))
				})
			}})
		case 4:
			p, size := path(), int64(next())*3000
			ops = append(ops, op{fmt.Sprintf("truncate %s %d", p, size), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					_, err := s.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: size})
					return errStr(err)
				})
			}})
		case 5:
			p, excl := path(), next()&1 == 1
			ops = append(ops, op{fmt.Sprintf("create %s excl=%v", p, excl), func(s tfs) string {
				dir, name := split(p)
				return onPath(s, dir, func(ino uint64) string {
					flags := unix.O_RDWR
					if excl {
						flags |= unix.O_EXCL
					}
					e, f, err := s.Create(ino, name, flags, 0o640, vfs.Caller{Uid: 7, Gid: 8}, s.opts)
					if err != nil {
						return errStr(err)
					}
					f.Release()
					s.Forget(e.Ino(), 1)
					return entryStr(e, err)
				})
			}})
		case 6:
			p, mode := path(), uint32(next())&0o777|0o700
			ops = append(ops, op{fmt.Sprintf("mkdir %s %o", p, mode), func(s tfs) string {
				dir, name := split(p)
				return onPath(s, dir, func(ino uint64) string {
					e, err := s.Mkdir(ino, name, mode, vfs.Root)
					if err == nil {
						s.Forget(e.Ino(), 1)
					}
					return entryStr(e, err)
				})
			}})
		case 7, 8:
			p := path()
			rm := kind == 8
			ops = append(ops, op{fmt.Sprintf("remove %s dir=%v", p, rm), func(s tfs) string {
				dir, name := split(p)
				return onPath(s, dir, func(ino uint64) string {
					if rm {
						return errStr(s.Rmdir(ino, name))
					}
					return errStr(s.Unlink(ino, name))
				})
			}})
		case 9, 10:
			p, q, fl := path(), path(), next()%4
			var flags uint32
			switch fl {
			case 2:
				flags = vfs.RenameNoReplace
			case 3:
				flags = vfs.RenameExchange
			}
			ops = append(ops, op{fmt.Sprintf("rename %s %s %d", p, q, flags), func(s tfs) string {
				pd, pn := split(p)
				qd, qn := split(q)
				return onPath(s, pd, func(pi uint64) string {
					return onPath(s, qd, func(qi uint64) string {
						return errStr(s.Rename(pi, pn, qi, qn, flags))
					})
				})
			}})
		case 11:
			p, q := path(), path()
			ops = append(ops, op{fmt.Sprintf("link %s %s", p, q), func(s tfs) string {
				qd, qn := split(q)
				return onPath(s, p, func(ino uint64) string {
					return onPath(s, qd, func(qi uint64) string {
						e, err := s.Link(ino, qi, qn)
						if err == nil {
							s.Forget(e.Ino(), 1)
						}
						return entryStr(e, err)
					})
				})
			}})
		case 12:
			p, target := path(), path()
			ops = append(ops, op{fmt.Sprintf("symlink %s %s", p, target), func(s tfs) string {
				dir, name := split(p)
				return onPath(s, dir, func(ino uint64) string {
					e, err := s.Symlink(ino, name, target, vfs.Root)
					if err == nil {
						s.Forget(e.Ino(), 1)
					}
					return entryStr(e, err)
				})
			}})
		case 13:
			p, mode := path(), uint32(next())<<3&0o7777|uint32(next())&7
			ops = append(ops, op{fmt.Sprintf("chmod %s %o", p, mode), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					st, err := s.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: mode})
					if err != nil {
						return errStr(err)
					}
					return statStr(st)
				})
			}})
		case 14:
			p, uid := path(), uint32(next())
			ops = append(ops, op{fmt.Sprintf("chown %s %d", p, uid), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					st, err := s.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetUid | vfs.SetGid, Uid: uid, Gid: uid + 1})
					if err != nil {
						return errStr(err)
					}
					return statStr(st)
				})
			}})
		case 15:
			p, sec := path(), int64(next())
			ops = append(ops, op{fmt.Sprintf("utimes %s %d", p, sec), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					ts := unix.Timespec{Sec: 1500000000 + sec, Nsec: 7}
					_, err := s.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetAtime | vfs.SetMtime, Atime: ts, Mtime: ts})
					return errStr(err)
				})
			}})
		case 16:
			p, v, rm := path(), next(), next()&3 == 0
			ops = append(ops, op{fmt.Sprintf("xattr %s %d rm=%v", p, v, rm), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					name := fmt.Sprintf("user.x%d", v%3)
					if rm {
						return errStr(s.RemoveXattr(ino, name))
					}
					return errStr(s.SetXattr(ino, name, []byte{v}, 0))
				})
			}})
		case 17:
			p, off, n, mode := path(), int64(next())*1000, int64(next())*300+1, next()%3
			ops = append(ops, op{fmt.Sprintf("fallocate %s %d %d %d", p, off, n, mode), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					f, err := s.Open(ino, unix.O_RDWR, s.opts)
					if err != nil {
						return errStr(err)
					}
					defer f.Release()
					var m uint32
					switch mode {
					case 1:
						m = unix.FALLOC_FL_PUNCH_HOLE | unix.FALLOC_FL_KEEP_SIZE
					case 2:
						m = unix.FALLOC_FL_ZERO_RANGE
					}
					return errStr(f.Allocate(m, off, n))
				})
			}})
		case 18:
			p := path()
			ops = append(ops, op{"readdir " + p, func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					ents, err := s.readDir(ino)
					if err != nil {
						return errStr(err)
					}
					var names []string
					for _, e := range ents {
						names = append(names, fmt.Sprintf("%s:%d", e.Name, e.Type))
					}
					sort.Strings(names)
					return strings.Join(names, ",")
				})
			}})
		case 20:
			p, k, rw := path(), int(next()%3), next()&1 == 1
			ops = append(ops, op{fmt.Sprintf("hold %s in %d rw=%v", p, k, rw), func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					flags := unix.O_RDONLY
					if rw {
						flags = unix.O_RDWR
					}
					f, err := s.Open(ino, flags, s.opts)
					if err != nil {
						return errStr(err)
					}
					setSlot(s, k, f)
					return "ok"
				})
			}})
		case 21:
			k, off, n := int(next()%3), int64(next())*1300, int(next())*500
			ops = append(ops, op{fmt.Sprintf("read slot %d %d %d", k, off, n), func(s tfs) string {
				f := getSlot(s, k)
				if f == nil {
					return "no file"
				}
				buf := make([]byte, n)
				got, err := f.ReadAt(buf, off)
				sum := sha256.Sum256(buf[:got])
				return fmt.Sprintf("%d %s %s", got, errStr(err), hex.EncodeToString(sum[:6]))
			}})
		case 22:
			k, off, n, seed := int(next()%3), int64(next())*1700, int(next())*40+1, next()
			ops = append(ops, op{fmt.Sprintf("write slot %d %d %d", k, off, n), func(s tfs) string {
				f := getSlot(s, k)
				if f == nil {
					return "no file"
				}
				got, err := f.WriteAt(pattern(n, seed), off, false)
				return fmt.Sprintf("%d %s", got, errStr(err))
			}})
		case 23:
			k := int(next() % 3)
			ops = append(ops, op{fmt.Sprintf("close slot %d", k), func(s tfs) string {
				setSlot(s, k, nil)
				return "ok"
			}})
		case 19:
			p := path()
			ops = append(ops, op{"readlink " + p, func(s tfs) string {
				return onPath(s, p, func(ino uint64) string {
					target, err := s.Readlink(ino)
					return target + " " + errStr(err)
				})
			}})
		}
	}
	return ops
}

// slots hold files the operations keep open, per file system.
var (
	slotsMu sync.Mutex
	slots   = map[tfs]*[3]vfs.File{}
)

func getSlot(s tfs, k int) vfs.File {
	slotsMu.Lock()
	defer slotsMu.Unlock()
	if a := slots[s]; a != nil {
		return a[k]
	}
	return nil
}

// setSlot puts f in slot k, closing what was there.
func setSlot(s tfs, k int, f vfs.File) {
	slotsMu.Lock()
	a := slots[s]
	if a == nil {
		a = new([3]vfs.File)
		slots[s] = a
	}
	old := a[k]
	a[k] = f
	slotsMu.Unlock()
	if old != nil {
		old.Release()
	}
}

func releaseSlots(s tfs) {
	for k := 0; k < 3; k++ {
		setSlot(s, k, nil)
	}
	slotsMu.Lock()
	delete(slots, s)
	slotsMu.Unlock()
}

// dump describes the whole tree of s, and returns path -> inode number.
func dump(t testing.TB, s tfs, checkDino bool) (string, map[string]uint64) {
	var b strings.Builder
	inos := map[string]uint64{}
	var walk func(ino uint64, path string)
	walk = func(ino uint64, path string) {
		st, err := s.GetAttr(ino)
		if err != nil {
			fmt.Fprintf(&b, "%s: getattr %s\n", path, errStr(err))
			return
		}
		inos[path] = st.Ino
		fmt.Fprintf(&b, "%s: %s", path, statStr(st))
		xl := make([]byte, 4096)
		if n, err := s.ListXattr(ino, xl); err == nil {
			names := strings.Split(string(xl[:n]), "\x00")
			sort.Strings(names)
			for _, name := range names {
				if name == "" {
					continue
				}
				v := make([]byte, 256)
				vn, err := s.GetXattr(ino, name, v)
				fmt.Fprintf(&b, " %s=%q/%s", name, v[:max(vn, 0)], errStr(err))
			}
		} else {
			fmt.Fprintf(&b, " listxattr %s", errStr(err))
		}
		switch st.Mode & unix.S_IFMT {
		case unix.S_IFREG:
			f, err := s.Open(ino, unix.O_RDONLY, s.opts)
			if err != nil {
				fmt.Fprintf(&b, " open %s\n", errStr(err))
				return
			}
			data := make([]byte, st.Size+10)
			n, err := f.ReadAt(data, 0)
			f.Release()
			sum := sha256.Sum256(data[:n])
			fmt.Fprintf(&b, " read %d %s %s\n", n, errStr(err), hex.EncodeToString(sum[:8]))
		case unix.S_IFLNK:
			target, err := s.Readlink(ino)
			fmt.Fprintf(&b, " -> %s %s\n", target, errStr(err))
		case unix.S_IFDIR:
			ents, err := s.readDir(ino)
			if err != nil {
				fmt.Fprintf(&b, " readdir %s\n", errStr(err))
				return
			}
			var names []string
			types := map[string]uint8{}
			dinos := map[string]uint64{}
			for _, e := range ents {
				if e.Name == "." || e.Name == ".." {
					continue
				}
				names = append(names, e.Name)
				types[e.Name], dinos[e.Name] = e.Type, e.Ino
			}
			sort.Strings(names)
			fmt.Fprintf(&b, " entries %q\n", names)
			for _, name := range names {
				e, err := s.Lookup(ino, name)
				if err != nil {
					fmt.Fprintf(&b, "%s/%s: lookup %s\n", path, name, errStr(err))
					continue
				}
				if checkDino && e.Ino() != dinos[name] {
					t.Errorf("%s/%s: readdir ino %#x, lookup ino %#x", path, name, dinos[name], e.Ino())
				}
				if want := uint8(e.Stat.Mode & unix.S_IFMT >> 12); types[name] != want {
					t.Errorf("%s/%s: readdir type %d, lookup type %d", path, name, types[name], want)
				}
				walk(e.Ino(), path+"/"+name)
				s.Forget(e.Ino(), 1)
			}
		default:
			b.WriteByte('\n')
		}
	}
	walk(vfs.RootIno, "")
	return b.String(), inos
}

// check compares the whole trees and the inode pairing.
func (o *oracle) check() {
	ovDump, ovInos := dump(o.t, o.ov, true)
	orDump, orInos := dump(o.t, o.or, false)
	if ovDump != orDump {
		o.t.Fatalf("trees differ after:\n%s\noverlay:\n%s\noracle:\n%s", strings.Join(o.log, "\n"), ovDump, orDump)
	}
	// A successor daemon sees the same tree from what the upper records.
	fs2, err := New(o.fs.upper, o.fs.lower)
	if err != nil {
		o.t.Fatal(err)
	}
	reDump, reInos := dump(o.t, overlayT(fs2), true)
	fs2.Close()
	if reDump != ovDump {
		o.t.Fatalf("a new FS over the same upper differs after:\n%s\nnew:\n%s\nold:\n%s", strings.Join(o.log, "\n"), reDump, ovDump)
	}
	for path, ino := range reInos {
		if ovInos[path] != ino {
			o.t.Fatalf("%s: a new FS over the same upper says inode %#x, not %#x, after:\n%s", path, ino, ovInos[path], strings.Join(o.log, "\n"))
		}
	}
	for path, ovi := range ovInos {
		ori := orInos[path]
		if want, ok := o.inos[ovi]; ok && want != ori {
			o.t.Fatalf("%s: overlay inode %#x was paired with oracle inode %d, now %d, after:\n%s", path, ovi, want, ori, strings.Join(o.log, "\n"))
		}
		if want, ok := o.back[ori]; ok && want != ovi {
			o.t.Fatalf("%s: oracle inode %d was paired with overlay inode %#x, now %#x, after:\n%s", path, ori, want, ovi, strings.Join(o.log, "\n"))
		}
		o.inos[ovi], o.back[ori] = ori, ovi
	}
	if err := o.fs.CheckInvariants(); err != nil {
		o.t.Fatalf("invariants: %v after:\n%s", err, strings.Join(o.log, "\n"))
	}
}

// run runs ops on both and compares every result and, every few
// operations, the whole trees.
func (o *oracle) run(ops []op) {
	o.t.Cleanup(func() {
		releaseSlots(o.ov)
		releaseSlots(o.or)
	})
	o.check()
	for i, op := range ops {
		got, want := op.run(o.ov), op.run(o.or)
		o.log = append(o.log, fmt.Sprintf("%s => %s", op.name, want))
		if got != want {
			o.t.Fatalf("%s: overlay %q, oracle %q, after:\n%s", op.name, got, want, strings.Join(o.log, "\n"))
		}
		if i%4 == 3 || i == len(ops)-1 {
			o.check()
		}
	}
	releaseSlots(o.ov)
	releaseSlots(o.or)
	o.check()
	// Every reference was dropped: only the root is left.
	o.fs.mu.Lock()
	left := len(o.fs.nodes)
	o.fs.mu.Unlock()
	if left != 1 {
		o.t.Errorf("%d nodes left after every reference was dropped", left)
	}
	if testing.Verbose() {
		o.t.Logf("ran:\n%s", strings.Join(o.log, "\n"))
	}
	if r := o.fs.upper.Refs(vfs.RootIno); r == 0 {
		o.t.Fatal("root lost")
	}
}

// oracleSeeds are programs kept in the normal tests; each byte sequence
// decodes as decode does.
var oracleSeeds = [][]byte{
	{0, 1, 2, 0, 3, 2, 1, 5, 40, 1, 0, 1},
	{7, 1, 7, 2, 8, 3, 18, 0, 18, 1},                                     // unlink lower files, rmdir
	{9, 3, 19, 0, 9, 0, 28, 0, 18, 0, 18, 19},                            // rename lower dir a -> new, readdir
	{2, 9, 5, 1, 7, 9, 0, 10, 0, 11, 0, 20},                              // write hl, unlink b/hl, stat
	{6, 18, 10, 8, 2, 6, 2, 0o75, 18, 2, 5, 21, 1},                       // rmdir c then mkdir c: opaque
	{13, 1, 3, 5, 14, 2, 200, 15, 4, 9, 16, 1, 5, 0},                     // chmod chown utimes xattr
	{3, 2, 100, 3, 1, 1, 2, 0, 0, 4, 2, 50, 17, 2, 3, 5, 1, 1, 2, 99, 3}, // big file ranges
	{11, 1, 21, 11, 8, 22, 0, 8, 0, 10, 0, 10, 9, 3, 9, 3},               // hard links
	{10, 2, 12, 3, 10, 15, 11, 1, 10, 3, 1, 2},                           // exchange and noreplace
	{8, 0, 8, 6, 7, 5, 7, 6, 8, 5, 8, 3, 8, 0, 18, 0},                    // deep removal
	{9, 15, 0, 0, 18, 18, 9, 0, 15, 3, 0, 6},                             // rename lower dir into another
	{4, 2, 30, 1, 2, 0, 255, 2, 2, 250, 10, 7, 4, 2, 200, 1, 2, 0, 255},  // truncate big
}

// TestOracleRandom runs pseudo-random programs (more without -short) from a
// fixed seed, so that a run is repeatable and CI never flakes; exploring
// new programs is FuzzOracle's job (make fuzz).
func TestOracleRandom(t *testing.T) {
	lower := makeLower(t)
	runs := 40
	if testing.Short() {
		runs = 8
	}
	rnd := rand.New(rand.NewPCG(20261122, 1))
	for i := 0; i < runs; i++ {
		prog := make([]byte, 40+rnd.IntN(160))
		for j := range prog {
			prog[j] = byte(rnd.UintN(256))
		}
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			defer func() {
				if t.Failed() {
					t.Logf("program: %v", prog)
				}
			}()
			newOracle(t, lower).run(decode(prog))
		})
	}
}

func TestOracleSeeds(t *testing.T) {
	lower := makeLower(t)
	for i, prog := range oracleSeeds {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			newOracle(t, lower).run(decode(prog))
		})
	}
}

// devPaths are the names of TestOracleDevices: the device nodes of
// makeDevLower, other entries to rename and link them over, new names.
var devPaths = []string{"a/cdev", "bdev", "a", "c", "a/f1", "fifo", "c/x", "new", "a/new", "b"}

// TestOracleDevices runs programs on devPaths over makeDevLower: stat,
// chmod, chown, xattrs, truncate and opens of lower and copied-up device
// nodes, and renames, links and removals of them, must match a plain
// memfs.
func TestOracleDevices(t *testing.T) {
	lower := makeDevLower(t)
	progs := [][]byte{
		{0, 0, 0, 1, 18, 2, 18, 3},                                // stat both, readdir a and c
		{13, 0, 0o11, 4, 0, 0, 4, 0, 1, 18, 2},                    // chmod a/cdev (copy-up), stat, truncate
		{14, 1, 9, 1, 1, 0, 0, 2, 1, 0, 1, 0, 20, 0, 0, 0},        // chown bdev, read, write and hold opens
		{9, 1, 6, 0, 7, 6, 0, 1, 0, 6},                            // rename bdev to c/x, remove it
		{11, 0, 7, 0, 7, 9, 4, 7, 0, 0, 0, 7, 0, 0, 7},            // link a/cdev as new, rename a/f1 over new
		{10, 0, 3, 3, 0, 3, 0, 0, 10, 3, 0, 3, 9, 1, 4, 2},        // exchange a/cdev and c twice, noreplace bdev
		{16, 0, 5, 1, 16, 1, 5, 0, 7, 0, 7, 1, 18, 2, 0, 0, 0, 1}, // xattrs, then unlink both
	}
	rnd := rand.New(rand.NewPCG(20261123, 2))
	for range 20 {
		prog := make([]byte, 20+rnd.IntN(60))
		for j := range prog {
			prog[j] = byte(rnd.UintN(256))
		}
		progs = append(progs, prog)
	}
	for i, prog := range progs {
		t.Run(fmt.Sprint(i), func(t *testing.T) {
			defer func() {
				if t.Failed() {
					t.Logf("program: %v", prog)
				}
			}()
			newOracle(t, lower).run(decodeOn(prog, devPaths))
		})
	}
}

// FuzzOracle decodes bytes into operations, runs them on an overlay over
// the test lower and on a memfs holding a copy of it, and compares every
// result, every readdir and every stat (but device and inode numbers; those
// must pair one to one over the whole run).
func FuzzOracle(f *testing.F) {
	for _, s := range oracleSeeds {
		f.Add(s)
	}
	lower := makeLower(f)
	f.Fuzz(func(t *testing.T, prog []byte) {
		if len(prog) > 200 {
			prog = prog[:200]
		}
		newOracle(t, lower).run(decode(prog))
	})
}

var _ = bytes.Equal
