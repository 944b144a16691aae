package main

import (
	"bufio"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	iofs "io/fs"
	"math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// cmdMeta creates, stats, lists and unlinks n small files spread over dirs
// directories under dir, one syscall loop per phase, and prints each
// phase's rate as "name<TAB>ops/s" lines. readdir counts entries returned.
func cmdMeta(args []string) error {
	fs := flag.NewFlagSet("meta", flag.ExitOnError)
	dir := fs.String("dir", "", "directory to work in (must exist)")
	n := fs.Int("n", 20000, "number of files")
	ndirs := fs.Int("dirs", 20, "number of directories the files are spread over")
	size := fs.Int("size", 100, "bytes written into each file")
	fs.Parse(args)
	if *dir == "" || *n <= 0 || *ndirs <= 0 {
		return errors.New("need -dir, -n > 0 and -dirs > 0")
	}
	dirs := make([]string, *ndirs)
	for i := range dirs {
		dirs[i] = filepath.Join(*dir, fmt.Sprintf("m%03d", i))
		if err := syscall.Mkdir(dirs[i], 0o755); err != nil {
			return fmt.Errorf("mkdir %s: %w", dirs[i], err)
		}
	}
	paths := make([]string, *n)
	for i := range paths {
		paths[i] = filepath.Join(dirs[i%*ndirs], fmt.Sprintf("file-%06d", i))
	}
	payload := make([]byte, *size)
	for i := range payload {
		payload[i] = byte('a' + i%26)
	}

	start := time.Now()
	for _, p := range paths {
		fd, err := syscall.Open(p, syscall.O_CREAT|syscall.O_EXCL|syscall.O_WRONLY|syscall.O_CLOEXEC, 0o644)
		if err != nil {
			return fmt.Errorf("create %s: %w", p, err)
		}
		if len(payload) > 0 {
			if w, err := syscall.Write(fd, payload); err != nil || w != len(payload) {
				syscall.Close(fd)
				return fmt.Errorf("write %s: %d, %v", p, w, err)
			}
		}
		if err := syscall.Close(fd); err != nil {
			return fmt.Errorf("close %s: %w", p, err)
		}
	}
	report("create", len(paths), time.Since(start))

	start = time.Now()
	var st syscall.Stat_t
	for _, p := range paths {
		if err := syscall.Lstat(p, &st); err != nil {
			return fmt.Errorf("stat %s: %w", p, err)
		}
		if st.Size != int64(len(payload)) {
			return fmt.Errorf("stat %s: size %d, want %d", p, st.Size, len(payload))
		}
	}
	report("stat", len(paths), time.Since(start))

	start = time.Now()
	entries := 0
	for _, d := range dirs {
		f, err := os.Open(d)
		if err != nil {
			return err
		}
		names, err := f.Readdirnames(-1)
		f.Close()
		if err != nil {
			return fmt.Errorf("readdir %s: %w", d, err)
		}
		entries += len(names)
	}
	elapsed := time.Since(start)
	if entries != len(paths) {
		return fmt.Errorf("readdir: %d entries, want %d", entries, len(paths))
	}
	report("readdir", entries, elapsed)

	// The same listing as ls, find, du and rm make it: glibc's readdir
	// asks getdents64 for 32 KiB at a time, where Go's asks for 8 KiB.
	// A create and an unlink in each directory first, untimed, drop what
	// the phase above left cached, as any change of the directory does.
	for _, d := range dirs {
		p := filepath.Join(d, "relist")
		fd, err := syscall.Open(p, syscall.O_CREAT|syscall.O_EXCL|syscall.O_WRONLY|syscall.O_CLOEXEC, 0o644)
		if err != nil {
			return fmt.Errorf("create %s: %w", p, err)
		}
		syscall.Close(fd)
		if err := syscall.Unlink(p); err != nil {
			return fmt.Errorf("unlink %s: %w", p, err)
		}
	}
	buf := make([]byte, 32<<10)
	start = time.Now()
	entries = 0
	for _, d := range dirs {
		n, err := countEntries(d, buf)
		if err != nil {
			return err
		}
		entries += n
	}
	elapsed = time.Since(start)
	if entries != len(paths) {
		return fmt.Errorf("readdir with 32 KiB: %d entries, want %d", entries, len(paths))
	}
	report("readdir32", entries, elapsed)

	start = time.Now()
	for _, p := range paths {
		if err := syscall.Unlink(p); err != nil {
			return fmt.Errorf("unlink %s: %w", p, err)
		}
	}
	report("unlink", len(paths), time.Since(start))

	for _, d := range dirs {
		if err := syscall.Rmdir(d); err != nil {
			return fmt.Errorf("rmdir %s: %w", d, err)
		}
	}
	return nil
}

// countEntries lists dir with getdents64 into buf and returns how many
// entries it has besides "." and "..".
func countEntries(dir string, buf []byte) (int, error) {
	fd, err := syscall.Open(dir, syscall.O_RDONLY|syscall.O_DIRECTORY|syscall.O_CLOEXEC, 0)
	if err != nil {
		return 0, fmt.Errorf("open %s: %w", dir, err)
	}
	defer syscall.Close(fd)
	entries := 0
	var names []string
	for {
		n, err := syscall.Getdents(fd, buf)
		if err != nil {
			return 0, fmt.Errorf("getdents %s: %w", dir, err)
		}
		if n == 0 {
			return entries, nil
		}
		// ParseDirent leaves "." and ".." out.
		_, _, names = syscall.ParseDirent(buf[:n], -1, names[:0])
		entries += len(names)
	}
}

func report(name string, ops int, d time.Duration) {
	fmt.Printf("%s\t%.0f\n", name, float64(ops)/d.Seconds())
}

// cmdGentree writes a deterministic tree of n files of mixed sizes (most
// small, a few up to 1 MiB, like a source tree) under dir and prints the
// number of files, directories and bytes. The same seed gives the same
// names, sizes and bytes on every machine.
func cmdGentree(args []string) error {
	fs := flag.NewFlagSet("gentree", flag.ExitOnError)
	dir := fs.String("dir", "", "directory to fill (created)")
	n := fs.Int("n", 5000, "number of files")
	seed := fs.Uint64("seed", 1, "seed")
	fs.Parse(args)
	if *dir == "" || *n <= 0 {
		return errors.New("need -dir and -n > 0")
	}
	rng := rand.New(rand.NewPCG(*seed, *seed^0x9e3779b97f4a7c15))
	data := rand.NewChaCha8([32]byte{byte(*seed)})

	// About 40 files per directory, in a tree of random shape.
	dirs := []string{*dir}
	if err := os.MkdirAll(*dir, 0o755); err != nil {
		return err
	}
	for i := 1; i < *n/40+1; i++ {
		d := filepath.Join(dirs[rng.IntN(len(dirs))], fmt.Sprintf("pkg%03d", i))
		if err := os.Mkdir(d, 0o755); err != nil {
			return err
		}
		dirs = append(dirs, d)
	}
	exts := []string{".go", ".c", ".h", ".txt", ".json", ".md", ".bin"}
	var total int64
	buf := make([]byte, 1<<20)
	for i := 0; i < *n; i++ {
		var size int
		switch p := rng.IntN(1000); {
		case p < 550:
			size = rng.IntN(4 << 10)
		case p < 850:
			size = 4<<10 + rng.IntN(12<<10)
		case p < 970:
			size = 16<<10 + rng.IntN(48<<10)
		case p < 997:
			size = 64<<10 + rng.IntN(192<<10)
		default:
			size = 256<<10 + rng.IntN(768<<10)
		}
		name := filepath.Join(dirs[rng.IntN(len(dirs))], fmt.Sprintf("f%05d%s", i, exts[rng.IntN(len(exts))]))
		b := buf[:size]
		data.Read(b)
		if err := os.WriteFile(name, b, 0o644); err != nil {
			return err
		}
		total += int64(size)
	}
	fmt.Printf("files\t%d\ndirs\t%d\nbytes\t%d\n", *n, len(dirs), total)
	return nil
}

// cmdAppend appends one byte to FILE (open O_APPEND, write, close) and
// prints the seconds that took: the cost of a copy-up on an overlay.
func cmdAppend(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: append FILE")
	}
	start := time.Now()
	fd, err := syscall.Open(args[0], syscall.O_WRONLY|syscall.O_APPEND|syscall.O_CLOEXEC, 0)
	if err != nil {
		return fmt.Errorf("open: %w", err)
	}
	if _, err := syscall.Write(fd, []byte{'x'}); err != nil {
		syscall.Close(fd)
		return fmt.Errorf("write: %w", err)
	}
	if err := syscall.Close(fd); err != nil {
		return fmt.Errorf("close: %w", err)
	}
	fmt.Printf("%.6f\n", time.Since(start).Seconds())
	return nil
}

// cmdRename renames OLD to NEW with rename(2) and prints the seconds it
// took. On EXDEV (kernel overlayfs without redirect_dir) it exits 3 and the
// caller measures mv's copy fallback instead.
func cmdRename(args []string) error {
	if len(args) != 2 {
		return errors.New("usage: rename OLD NEW")
	}
	start := time.Now()
	err := syscall.Rename(args[0], args[1])
	if err == syscall.EXDEV {
		return exitError(3)
	}
	if err != nil {
		return err
	}
	fmt.Printf("%.6f\n", time.Since(start).Seconds())
	return nil
}

// cmdFio prints, from fio's JSON output (group_reporting on), the summed
// read and write bandwidth in bytes/s and IOPS as "name<TAB>value" lines.
func cmdFio(args []string) error {
	if len(args) != 1 {
		return errors.New("usage: fio FILE.json")
	}
	raw, err := os.ReadFile(args[0])
	if err != nil {
		return err
	}
	// fio may print notes before the JSON object.
	if i := strings.IndexByte(string(raw), '{'); i > 0 {
		raw = raw[i:]
	}
	var out struct {
		Jobs []struct {
			Error int `json:"error"`
			Read  struct {
				BwBytes float64 `json:"bw_bytes"`
				Iops    float64 `json:"iops"`
			} `json:"read"`
			Write struct {
				BwBytes float64 `json:"bw_bytes"`
				Iops    float64 `json:"iops"`
			} `json:"write"`
		} `json:"jobs"`
	}
	if err := json.Unmarshal(raw, &out); err != nil {
		return fmt.Errorf("%s: %w", args[0], err)
	}
	var rbw, riops, wbw, wiops float64
	for _, j := range out.Jobs {
		if j.Error != 0 {
			return fmt.Errorf("%s: job error %d", args[0], j.Error)
		}
		rbw += j.Read.BwBytes
		riops += j.Read.Iops
		wbw += j.Write.BwBytes
		wiops += j.Write.Iops
	}
	fmt.Printf("read_bw\t%.0f\nread_iops\t%.0f\nwrite_bw\t%.0f\nwrite_iops\t%.0f\n", rbw, riops, wbw, wiops)
	return nil
}

// meminfo returns /proc/meminfo's fields in KiB.
func meminfo() (map[string]int64, error) {
	f, err := os.Open("/proc/meminfo")
	if err != nil {
		return nil, err
	}
	defer f.Close()
	m := map[string]int64{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Fields(sc.Text())
		if len(fields) < 2 {
			continue
		}
		v, err := strconv.ParseInt(fields[1], 10, 64)
		if err != nil {
			continue
		}
		m[strings.TrimSuffix(fields[0], ":")] = v
	}
	return m, sc.Err()
}

// cmdMeminfo prints Cached and Shmem in KiB (Cached already includes Shmem).
func cmdMeminfo(args []string) error {
	m, err := meminfo()
	if err != nil {
		return err
	}
	fmt.Printf("%d %d\n", m["Cached"], m["Shmem"])
	return nil
}

// cmdMemback polls /proc/meminfo every 20 ms until 90% of the growth of
// Cached from -base to -peak (KiB) is gone, and prints the seconds that
// took, or the timeout with exit 4. The 90% rule keeps other processes'
// page-cache drift on a shared machine from hiding the release.
func cmdMemback(args []string) error {
	fs := flag.NewFlagSet("memback", flag.ExitOnError)
	base := fs.Int64("base", 0, "Cached before the data was written, KiB")
	peak := fs.Int64("peak", 0, "Cached while the data was held, KiB")
	timeout := fs.Duration("timeout", 30*time.Second, "give up after")
	fs.Parse(args)
	goal := *peak - (*peak-*base)*9/10
	start := time.Now()
	for {
		m, err := meminfo()
		if err != nil {
			return err
		}
		if m["Cached"] <= goal {
			fmt.Printf("%.3f\n", time.Since(start).Seconds())
			return nil
		}
		if time.Since(start) > *timeout {
			fmt.Printf("%.3f\n", time.Since(start).Seconds())
			return exitError(4)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

// cmdFiles opens, fstats, reads to the end and closes every regular file
// under -dir, in walk order, from one locked thread, and prints the mean
// time of each step per file ("open<TAB>µs" ...) and that thread's
// context switches per file ("voluntary", "involuntary"): where a file's
// time goes, and whether a request the caller does not wait for (a
// RELEASE at close) took the CPU from it.
func cmdFiles(args []string) error {
	fs := flag.NewFlagSet("files", flag.ExitOnError)
	dir := fs.String("dir", "", "directory to walk (must exist)")
	fs.Parse(args)
	if *dir == "" {
		return errors.New("need -dir")
	}
	var paths []string
	err := filepath.WalkDir(*dir, func(p string, d iofs.DirEntry, err error) error {
		if err == nil && d.Type().IsRegular() {
			paths = append(paths, p)
		}
		return err
	})
	if err != nil {
		return err
	}
	if len(paths) == 0 {
		return fmt.Errorf("no regular file under %s", *dir)
	}
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	var before, after syscall.Rusage
	if err := syscall.Getrusage(rusageThread, &before); err != nil {
		return err
	}
	buf := make([]byte, 128<<10)
	var st syscall.Stat_t
	var steps [4]time.Duration // open, fstat, read, close
	for _, p := range paths {
		t0 := time.Now()
		fd, err := syscall.Open(p, syscall.O_RDONLY|syscall.O_CLOEXEC, 0)
		if err != nil {
			return fmt.Errorf("open %s: %w", p, err)
		}
		t1 := time.Now()
		err = syscall.Fstat(fd, &st)
		t2 := time.Now()
		for err == nil {
			var n int
			if n, err = syscall.Read(fd, buf); n == 0 {
				break
			}
		}
		t3 := time.Now()
		if cerr := syscall.Close(fd); err == nil {
			err = cerr
		}
		if err != nil {
			return fmt.Errorf("%s: %w", p, err)
		}
		for i, d := range []time.Duration{t1.Sub(t0), t2.Sub(t1), t3.Sub(t2), time.Since(t3)} {
			steps[i] += d
		}
	}
	if err := syscall.Getrusage(rusageThread, &after); err != nil {
		return err
	}
	n := float64(len(paths))
	for i, name := range []string{"open", "fstat", "read", "close"} {
		fmt.Printf("%s\t%.2f\n", name, float64(steps[i].Nanoseconds())/1e3/n)
	}
	fmt.Printf("voluntary\t%.2f\ninvoluntary\t%.2f\n", float64(after.Nvcsw-before.Nvcsw)/n, float64(after.Nivcsw-before.Nivcsw)/n)
	return nil
}

// rusageThread is RUSAGE_THREAD (linux/resource.h): the calling thread's
// usage, which package syscall does not name.
const rusageThread = 1
