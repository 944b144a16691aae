package overlay

import (
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/vfs"
)

var update = flag.Bool("update", false, "rewrite the golden files in testdata/golden")

// TestGolden runs the scripts in testdata/golden on an overlay over the
// test lower. A script is a sequence of "> command" lines, each followed by
// its expected output; -update rewrites the expectations. The commands are
// those of goldenRunner.do.
func TestGolden(t *testing.T) {
	files, err := filepath.Glob("testdata/golden/*.txt")
	if err != nil || len(files) == 0 {
		t.Fatalf("no scripts: %v", err)
	}
	lower := makeLower(t)
	for _, file := range files {
		t.Run(filepath.Base(file), func(t *testing.T) {
			data, err := os.ReadFile(file)
			if err != nil {
				t.Fatal(err)
			}
			r := &goldenRunner{t: t, fs: newOverlay(t, lower)}
			var out strings.Builder
			for _, line := range strings.Split(strings.TrimRight(string(data), "\n"), "\n") {
				switch {
				case strings.HasPrefix(line, "> "):
					out.WriteString(line + "\n")
					res := r.do(strings.Fields(line[2:]))
					if res == "" {
						res = "(empty)"
					}
					out.WriteString(res + "\n")
				case strings.HasPrefix(line, "#") || line == "":
					out.WriteString(line + "\n")
				}
			}
			if *update {
				if err := os.WriteFile(file, []byte(out.String()), 0o644); err != nil {
					t.Fatal(err)
				}
				return
			}
			if got := out.String(); got != string(data) {
				t.Errorf("%s differs (run with -update to see):\ngot:\n%s\nwant:\n%s", file, got, data)
			}
		})
	}
}

type goldenRunner struct {
	t  *testing.T
	fs *FS
}

func (r *goldenRunner) s() tfs { return overlayT(r.fs) }

// typeChar names a file type in listings.
func typeChar(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFDIR:
		return "d"
	case unix.S_IFREG:
		return "f"
	case unix.S_IFLNK:
		return "l"
	case unix.S_IFIFO:
		return "p"
	}
	return "?"
}

// do runs one command and describes its result.
func (r *goldenRunner) do(args []string) string {
	s := r.s()
	arg := func(i int) string {
		if i < len(args) {
			return args[i]
		}
		return ""
	}
	num := func(i int) int64 {
		n, err := strconv.ParseInt(arg(i), 0, 64)
		if err != nil {
			r.t.Fatalf("bad number %q in %v", arg(i), args)
		}
		return n
	}
	parentDo := func(path string, fn func(dir uint64, name string) string) string {
		dir, name := split(path)
		return onPath(s, dir, func(ino uint64) string { return fn(ino, name) })
	}
	switch args[0] {
	case "ls":
		return onPath(s, arg(1), func(ino uint64) string {
			ents, err := s.readDir(ino)
			if err != nil {
				return errStr(err)
			}
			var names []string
			for _, e := range ents {
				if e.Name == "." || e.Name == ".." {
					continue
				}
				names = append(names, e.Name+"("+typeChar(uint32(e.Type)<<12)+")")
			}
			sort.Strings(names)
			return strings.Join(names, " ")
		})
	case "cat":
		return onPath(s, arg(1), func(ino uint64) string {
			f, err := s.Open(ino, unix.O_RDONLY, s.opts)
			if err != nil {
				return errStr(err)
			}
			defer f.Release()
			off, n := int64(0), int64(1<<20)
			if len(args) > 2 {
				off, n = num(2), num(3)
			}
			buf := make([]byte, n)
			got, err := f.ReadAt(buf, off)
			if err != nil {
				return errStr(err)
			}
			if got <= 64 {
				return strconv.Quote(string(buf[:got]))
			}
			return fmt.Sprintf("%d bytes, pattern %v", got, isPattern(buf[:got], off))
		})
	case "stat":
		return onPath(s, arg(1), func(ino uint64) string {
			st, err := s.GetAttr(ino)
			if err != nil {
				return errStr(err)
			}
			layer := "upper"
			if st.Ino&lowerBit != 0 {
				layer = "lower-ino"
			}
			return statStr(st) + " " + layer
		})
	case "ino":
		a, _ := resolve(s, arg(1))
		b, _ := resolve(s, arg(2))
		defer s.Forget(a, 1)
		defer s.Forget(b, 1)
		return fmt.Sprintf("same=%v", a == b && a != 0)
	case "write", "append":
		return onPath(s, arg(1), func(ino uint64) string {
			f, err := s.Open(ino, unix.O_RDWR, s.opts)
			if err != nil {
				return errStr(err)
			}
			defer f.Release()
			var off int64
			text := arg(2)
			if args[0] == "write" {
				off, text = num(2), arg(3)
			} else {
				st, _ := s.GetAttr(ino)
				off = st.Size
			}
			n, err := f.WriteAt([]byte(text), off, false)
			return fmt.Sprintf("%d %s", n, errStr(err))
		})
	case "truncate":
		return onPath(s, arg(1), func(ino uint64) string {
			_, err := s.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetSize, Size: num(2)})
			return errStr(err)
		})
	case "punch":
		return onPath(s, arg(1), func(ino uint64) string {
			f, err := s.Open(ino, unix.O_RDWR, s.opts)
			if err != nil {
				return errStr(err)
			}
			defer f.Release()
			return errStr(f.Allocate(unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, num(2), num(3)))
		})
	case "rm":
		return parentDo(arg(1), func(dir uint64, name string) string { return errStr(s.Unlink(dir, name)) })
	case "rmdir":
		return parentDo(arg(1), func(dir uint64, name string) string { return errStr(s.Rmdir(dir, name)) })
	case "mkdir":
		return parentDo(arg(1), func(dir uint64, name string) string {
			e, err := s.Mkdir(dir, name, 0o755, vfs.Root)
			if err == nil {
				s.Forget(e.Ino(), 1)
			}
			return errStr(err)
		})
	case "touch":
		return parentDo(arg(1), func(dir uint64, name string) string {
			e, f, err := s.Create(dir, name, unix.O_RDWR|unix.O_EXCL, 0o644, vfs.Root, s.opts)
			if err == nil {
				f.Release()
				s.Forget(e.Ino(), 1)
			}
			return errStr(err)
		})
	case "mv":
		var flags uint32
		from, to := arg(1), arg(2)
		switch arg(1) {
		case "noreplace":
			flags, from, to = vfs.RenameNoReplace, arg(2), arg(3)
		case "exchange":
			flags, from, to = vfs.RenameExchange, arg(2), arg(3)
		}
		return parentDo(from, func(pd uint64, pn string) string {
			return parentDo(to, func(qd uint64, qn string) string {
				return errStr(s.Rename(pd, pn, qd, qn, flags))
			})
		})
	case "ln":
		return onPath(s, arg(1), func(ino uint64) string {
			return parentDo(arg(2), func(dir uint64, name string) string {
				e, err := s.Link(ino, dir, name)
				if err == nil {
					s.Forget(e.Ino(), 1)
				}
				return errStr(err)
			})
		})
	case "chmod":
		return onPath(s, arg(1), func(ino uint64) string {
			_, err := s.SetAttr(ino, nil, vfs.SetAttr{Valid: vfs.SetMode, Mode: uint32(num(2))})
			return errStr(err)
		})
	case "setxattr":
		return onPath(s, arg(1), func(ino uint64) string {
			return errStr(s.SetXattr(ino, arg(2), []byte(arg(3)), 0))
		})
	case "xattrs":
		return onPath(s, arg(1), func(ino uint64) string {
			buf := make([]byte, 4096)
			n, err := s.ListXattr(ino, buf)
			if err != nil {
				return errStr(err)
			}
			var out []string
			for _, name := range strings.Split(string(buf[:n]), "\x00") {
				if name == "" {
					continue
				}
				v := make([]byte, 256)
				vn, err := s.GetXattr(ino, name, v)
				out = append(out, fmt.Sprintf("%s=%q/%s", name, v[:max(vn, 0)], errStr(err)))
			}
			sort.Strings(out)
			return strings.Join(out, " ")
		})
	case "open-write":
		return onPath(s, arg(1), func(ino uint64) string {
			f, err := s.Open(ino, unix.O_WRONLY, s.opts)
			if err == nil {
				f.Release()
			}
			return errStr(err)
		})
	case "upper":
		return r.upperState(arg(1))
	case "index":
		// The number of hard-link index entries.
		var n int
		d, err := r.fs.upper.OpenDir(r.fs.workIno)
		if err != nil {
			return errStr(err)
		}
		d.ReadDir(0, func(e *vfs.DirEntry) bool {
			if strings.HasPrefix(e.Name, "i") {
				n++
			}
			return true
		})
		d.Close()
		return fmt.Sprintf("%d index entries", n)
	case "usage":
		u, err := r.fs.Usage()
		if err != nil {
			return errStr(err)
		}
		return fmt.Sprintf("copied up %d bytes", u.CopiedUpBytes)
	case "restart":
		// A successor process: a new FS over the same layers.
		fs, err := New(r.fs.upper, r.fs.lower)
		if err != nil {
			return errStr(err)
		}
		r.fs = fs
		return "ok"
	}
	r.t.Fatalf("unknown command %v", args)
	return ""
}

// upperState describes the raw upper entry at path: its type and markers.
func (r *goldenRunner) upperState(path string) string {
	l := layerT(r.fs.upper)
	return onPath(l, path, func(ino uint64) string {
		st, err := l.GetAttr(ino)
		if err != nil {
			return errStr(err)
		}
		out := typeChar(st.Mode)
		if st.Mode&unix.S_IFMT == unix.S_IFREG {
			out += fmt.Sprintf(" size=%d blocks=%d", st.Size, st.Blocks)
		}
		for _, key := range []string{markerOv, markerRanges, markerMixed, markerLinks} {
			buf := make([]byte, 4096)
			n, err := r.fs.upper.GetMarker(ino, key, buf)
			if err == nil {
				v := string(buf[:n])
				if key == markerOv {
					// Overlay inode numbers depend on the lower file system.
					if m, err := decodeMeta(buf[:n]); err == nil && m.ino&lowerBit != 0 {
						m.ino = lowerBit
						v = string(m.encode())
					}
				}
				out += fmt.Sprintf(" %s=%q", key, v)
			}
		}
		return out
	})
}

// isPattern says whether b is what pattern(_, seed) holds at off for some
// seed.
func isPattern(b []byte, off int64) string {
	for _, seed := range []byte{1, 2, 3} {
		ok := true
		for i, c := range b {
			j := off + int64(i)
			if c != byte(j)^byte(j>>12)^seed {
				ok = false
				break
			}
		}
		if ok {
			return strconv.Itoa(int(seed))
		}
	}
	return "none"
}
