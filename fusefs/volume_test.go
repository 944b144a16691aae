package fusefs

import (
	"bufio"
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/internal/acltest"
)

// TestMain lets a test run a step as another user: the test binary re-runs
// itself with FUSEFS_TEST_AS set (and FUSEFS_TEST_UMASK, in octal, if the
// step creates), performs one action, and exits.
func TestMain(m *testing.M) {
	if action := os.Getenv("FUSEFS_TEST_AS"); action != "" {
		if mask, err := strconv.ParseUint(os.Getenv("FUSEFS_TEST_UMASK"), 8, 32); err == nil {
			unix.Umask(int(mask))
		}
		os.Exit(childAction(action, os.Args[len(os.Args)-1]))
	}
	code := m.Run()
	if helperBin != "" {
		os.RemoveAll(filepath.Dir(helperBin))
	}
	os.Exit(code)
}

// childAction performs action on path and prints the errno it got.
func childAction(action, path string) int {
	var err error
	switch action {
	case "write":
		var f *os.File
		if f, err = os.OpenFile(path, os.O_WRONLY, 0); err == nil {
			_, err = f.Write([]byte("unprivileged"))
			f.Close()
		}
	case "truncate":
		err = os.Truncate(path, 1)
	case "read":
		_, err = os.ReadFile(path)
	case "create":
		var fd int
		if fd, err = unix.Open(path, unix.O_CREAT|unix.O_EXCL|unix.O_WRONLY|unix.O_CLOEXEC, 0o666); err == nil {
			unix.Close(fd)
		}
	case "mkdir":
		err = unix.Mkdir(path, 0o777)
	case "set-marker":
		err = unix.Setxattr(path, "trusted.memfs.seals", []byte(""), 0)
	case "get-marker":
		_, err = unix.Getxattr(path, "trusted.memfs.seals", make([]byte, 64))
	case "unseal":
		err = unix.Removexattr(path, "user.memfs.seals")
	case "mknod-chr":
		err = unix.Mknod(path, unix.S_IFCHR|0o666, int(unix.Mkdev(1, 3)))
	case "hold":
		// Hold path open and read it when told (a line on stdin).
		var fd int
		if fd, err = unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC, 0); err == nil {
			fmt.Println("held")
			bufio.NewReader(os.Stdin).ReadString('\n')
			_, err = unix.Pread(fd, make([]byte, 16), 0)
		}
	case "set-acl-rwx":
		err = unix.Setxattr(path, aclAccess, acltest.Encode(
			acltest.Entry{Tag: acltest.UserObj, Perm: 7},
			acltest.Entry{Tag: acltest.GroupObj, Perm: 7},
			acltest.Entry{Tag: acltest.Other, Perm: 7}), 0)
	case "set-immutable":
		err = setFlags(path, flImmutable)
	case "set-nodump":
		err = setFlags(path, flNodump)
	case "mmap-write":
		err = mmapWrite(path)
	case "fsx":
		if err := fsx(path, 3000, rand.New(rand.NewPCG(1, 2))); err != nil {
			fmt.Println(err)
			return 1
		}
	}
	var errno syscall.Errno
	errors.As(err, &errno)
	fmt.Print(int(errno))
	return 0
}

var (
	helperOnce sync.Once
	helperBin  string
)

// helper returns a copy of the test binary that any user may run (go test
// builds it in a private directory).
func helper(t *testing.T) string {
	helperOnce.Do(func() {
		dir, err := os.MkdirTemp("", "fusefs-helper-")
		if err != nil {
			t.Fatal(err)
		}
		os.Chmod(dir, 0o755)
		data, err := os.ReadFile(os.Args[0])
		if err != nil {
			t.Fatal(err)
		}
		helperBin = filepath.Join(dir, "helper")
		if err := os.WriteFile(helperBin, data, 0o755); err != nil {
			t.Fatal(err)
		}
	})
	return helperBin
}

// asUser runs action on path as uid/gid 1000 and returns its errno.
func asUser(t *testing.T, action, path string) syscall.Errno {
	t.Helper()
	return asCaller(t, 1000, 0, action, path)
}

// asCaller runs action on path as uid and gid id, with the umask, and
// returns its errno.
func asCaller(t *testing.T, id, umask uint32, action, path string) syscall.Errno {
	t.Helper()
	return asIDs(t, id, id, umask, action, path)
}

// asIDs runs action on path as uid and gid (no supplementary groups),
// with the umask, and returns its errno.
func asIDs(t *testing.T, uid, gid, umask uint32, action, path string) syscall.Errno {
	t.Helper()
	cmd := exec.Command(helper(t), "-test.run=^$", path)
	cmd.Env = append(os.Environ(), "FUSEFS_TEST_AS="+action, "FUSEFS_TEST_UMASK="+strconv.FormatUint(uint64(umask), 8))
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: gid, Groups: []uint32{}}}
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("%s as uid %d gid %d: %v", action, uid, gid, err)
	}
	n, err := strconv.Atoi(strings.TrimSpace(string(out)))
	if err != nil {
		t.Fatalf("%s as uid %d gid %d printed %q", action, uid, gid, out)
	}
	return syscall.Errno(n)
}

// opCounter is an Observer counting requests by operation.
type opCounter struct {
	mu  sync.Mutex
	ops map[string]int
}

func (c *opCounter) ObserveOp(op string, _ time.Duration, _ syscall.Errno) {
	c.mu.Lock()
	c.ops[op]++
	c.mu.Unlock()
}

func (c *opCounter) count(op string) int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.ops[op]
}

// TestPassthroughBypassesDaemon: with passthrough no byte of a plain file
// passes through the daemon; without it every byte does.
func TestPassthroughBypassesDaemon(t *testing.T) {
	for _, disable := range []bool{false, true} {
		t.Run(fmt.Sprintf("disable=%v", disable), func(t *testing.T) {
			c := &opCounter{ops: map[string]int{}}
			mnt, _, srv := testMount(t, 64<<20, Options{DisablePassthrough: disable, Observer: c})
			p := filepath.Join(mnt, "data")
			want := bytes.Repeat([]byte("0123456789abcdef"), 1<<16)
			if err := os.WriteFile(p, want, 0o644); err != nil {
				t.Fatal(err)
			}
			// Read through a fresh open so the page cache cannot answer.
			got, err := os.ReadFile(p)
			if err != nil || !bytes.Equal(got, want) {
				t.Fatalf("read back %d bytes, err %v", len(got), err)
			}
			if got, want := srv.Passthrough(), !disable; got != want {
				t.Errorf("Passthrough() = %v, want %v", got, want)
			}
			served := c.count("READ") + c.count("WRITE")
			if !disable && served != 0 {
				t.Errorf("passthrough on: the daemon served %d reads and writes", served)
			}
			if disable && c.count("WRITE") == 0 {
				t.Error("passthrough off: the daemon served no write")
			}
			// close(2) costs no round trip: the first FLUSH is refused.
			for i := 0; i < 3; i++ {
				f, _ := os.Open(p)
				f.Close()
			}
			if got := c.count("FLUSH"); got > 1 {
				t.Errorf("%d FLUSH requests for 5 closes, want at most 1", got)
			}
		})
	}
}

func TestSealsThroughMount(t *testing.T) { testSeals(t, Options{}) }

func testSeals(t *testing.T, opts Options) {
	mnt, l, _ := testMount(t, 16<<20, opts)
	p := filepath.Join(mnt, "config")
	f, err := os.OpenFile(p, os.O_CREATE|os.O_RDWR, 0o666)
	if err != nil {
		t.Fatal(err)
	}
	f.Write(bytes.Repeat([]byte("c"), 5000))
	if got, want := unix.Setxattr(p, "user.memfs.seals", []byte("write"), 0), unix.EBUSY; got != want {
		t.Errorf("write seal with the file open for writing: %v, want %v", got, want)
	}
	f.Close()
	if err := unix.Setxattr(p, "user.memfs.seals", []byte("write,shrink"), 0); err != nil {
		t.Fatal(err)
	}
	buf := make([]byte, 64)
	n, err := unix.Getxattr(p, "user.memfs.seals", buf)
	if got, want := string(buf[:max(n, 0)]), "write,shrink"; err != nil || got != want {
		t.Errorf("seals = %q, %v; want %q", got, err, want)
	}
	_, err = os.OpenFile(p, os.O_WRONLY, 0)
	if !errors.Is(err, syscall.EPERM) {
		t.Errorf("write open of a sealed file: %v, want EPERM", err)
	}
	if err := os.Truncate(p, 10); !errors.Is(err, syscall.EPERM) {
		t.Errorf("truncate of a shrink-sealed file: %v, want EPERM", err)
	}
	if got, want := asUser(t, "write", p), syscall.EPERM; got != want {
		t.Errorf("unprivileged write: %v, want %v", got, want)
	}
	if got, want := asUser(t, "unseal", p), syscall.EPERM; got != want {
		t.Errorf("unprivileged unseal: %v, want %v", got, want)
	}
	if got, want := asUser(t, "set-marker", p), syscall.EPERM; got != want {
		t.Errorf("unprivileged marker write: %v, want %v", got, want)
	}
	if got, want := unix.Setxattr(p, "trusted.memfs.seals", []byte(""), 0), unix.EPERM; got != want {
		t.Errorf("root marker write: %v, want %v", got, want)
	}
	if _, got := unix.Getxattr(p, "trusted.memfs.seals", buf); got != unix.ENODATA {
		t.Errorf("root marker read: %v, want ENODATA", got)
	}
	if l.SealViolations() == 0 {
		t.Error("no seal violation counted")
	}

	// Grow seal: writes past the end are cut back to the EOF page.
	g := filepath.Join(mnt, "grow")
	os.WriteFile(g, bytes.Repeat([]byte("g"), 5000), 0o666)
	if err := unix.Setxattr(g, "user.memfs.seals", []byte("grow"), 0); err != nil {
		t.Fatal(err)
	}
	w, err := os.OpenFile(g, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer w.Close()
	n, err = unix.Pwrite(int(w.Fd()), make([]byte, 2000), 4000)
	if n != 96 {
		t.Errorf("grow-sealed write across EOF wrote %d (%v), want 96", n, err)
	}
	if _, err := w.WriteAt([]byte("x"), 6000); !errors.Is(err, syscall.EPERM) {
		t.Errorf("grow-sealed write past EOF: %v, want EPERM", err)
	}
	if fi, _ := os.Stat(g); fi.Size() != 5000 {
		t.Errorf("grow-sealed file grew to %d", fi.Size())
	}
}

// TestLimitsThroughMount: dd past the size fails with ENOSPC, what was
// written before is intact, and df shows the limit.
func TestLimitsThroughMount(t *testing.T) {
	const size = 8 << 20
	mnt, _, _ := testMount(t, size, Options{})
	keep := bytes.Repeat([]byte("keep me"), 1000)
	if err := os.WriteFile(filepath.Join(mnt, "keep"), keep, 0o644); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("dd", "if=/dev/zero", "of="+filepath.Join(mnt, "fill"), "bs=1M", "count=16").CombinedOutput()
	if err == nil || !strings.Contains(string(out), "No space left on device") {
		t.Errorf("dd past the limit: %v\n%s", err, out)
	}
	if got, _ := os.ReadFile(filepath.Join(mnt, "keep")); !bytes.Equal(got, keep) {
		t.Error("a file written before the volume filled up changed")
	}
	out, err = exec.Command("df", "-B1", "--output=size,used", mnt).Output()
	if err != nil {
		t.Fatal(err)
	}
	fields := strings.Fields(string(out))
	if len(fields) != 4 || fields[2] != strconv.Itoa(size) || fields[3] != strconv.Itoa(size) {
		t.Errorf("df: %q, want size and used %d", out, size)
	}
	// Memory comes back once the kernel has released the deleted file
	// (RELEASE and FORGET are asynchronous).
	os.Remove(filepath.Join(mnt, "fill"))
	start := time.Now()
	var free uint64
	for time.Since(start) < 5*time.Second {
		var st unix.Statfs_t
		unix.Statfs(mnt, &st)
		if free = st.Bfree * uint64(st.Bsize); free >= size-64<<10 {
			break
		}
		time.Sleep(time.Millisecond)
	}
	if free < size-64<<10 {
		t.Errorf("5s after the delete only %d bytes are free", free)
	}
	t.Logf("memory back %v after the delete", time.Since(start))
}

// TestUnprivilegedWritesClearSetID: a write or truncate by a user without
// CAP_FSETID clears set-ID bits, as on Linux, passthrough or not.
func TestUnprivilegedWritesClearSetID(t *testing.T) {
	mnt, _, _ := testMount(t, 16<<20, Options{})
	for _, action := range []string{"write", "truncate"} {
		p := filepath.Join(mnt, action)
		os.WriteFile(p, []byte("data"), 0o666)
		os.Chmod(p, 0o6777)
		if got := asUser(t, action, p); got != 0 {
			t.Fatalf("%s as uid 1000: %v", action, got)
		}
		fi, _ := os.Stat(p)
		if got, want := fi.Mode()&(os.ModeSetuid|os.ModeSetgid), os.FileMode(0); got != want {
			t.Errorf("after an unprivileged %s: mode %v, set-ID bits kept", action, fi.Mode())
		}
	}
}

// TestChownNoChange: chown(path, -1, -1) changes no owner, but Linux
// updates the change time and clears set-ID bits; FUSE sends it as a
// SETATTR with nothing to set. The volume behaves as its tmpfs does.
func TestChownNoChange(t *testing.T) {
	mnt, l, _ := testMount(t, 16<<20, Options{})
	for _, dir := range []string{l.Dir(), mnt} {
		p := filepath.Join(dir, "suid-"+filepath.Base(dir))
		if err := os.WriteFile(p, nil, 0o644); err != nil {
			t.Fatal(err)
		}
		if err := unix.Chmod(p, 0o6755); err != nil {
			t.Fatal(err)
		}
		var before, after unix.Stat_t
		unix.Stat(p, &before)
		time.Sleep(10 * time.Millisecond)
		if err := os.Chown(p, -1, -1); err != nil {
			t.Fatalf("chown -1 -1 in %s: %v", dir, err)
		}
		unix.Stat(p, &after)
		if after.Mode&07777 != 0o755 || after.Ctim == before.Ctim {
			t.Errorf("chown -1 -1 in %s: mode %o, ctime changed %v; want 755, true", dir, after.Mode&07777, after.Ctim != before.Ctim)
		}
	}
}

// checkInertDevice checks that path is a device node of mode and number
// rdev, and that it stays inert: the mount is nodev, so opening it fails
// with EACCES in the kernel, before any driver or the daemon sees it.
func checkInertDevice(t *testing.T, path string, mode uint32, rdev uint64) {
	t.Helper()
	var st unix.Stat_t
	if err := unix.Lstat(path, &st); err != nil {
		t.Fatalf("stat %s: %v", path, err)
	}
	if st.Mode != mode || st.Rdev != rdev {
		t.Errorf("stat %s: mode %o rdev %d:%d, want %o %d:%d", path, st.Mode,
			unix.Major(st.Rdev), unix.Minor(st.Rdev), mode, unix.Major(rdev), unix.Minor(rdev))
	}
	for _, flags := range []int{unix.O_RDONLY, unix.O_WRONLY, unix.O_RDWR | unix.O_NONBLOCK} {
		fd, err := unix.Open(path, flags|unix.O_CLOEXEC, 0)
		if err == nil {
			unix.Close(fd)
		}
		if err != unix.EACCES {
			t.Errorf("open %s with flags %#x: %v, want EACCES (nodev)", path, flags, err)
		}
	}
}

// TestDevicesThroughMount makes device nodes through the mount, as root
// can on tmpfs, and checks their numbers, that they cannot be opened, that
// they move, link and go like other files, and that an unprivileged user
// cannot make one.
func TestDevicesThroughMount(t *testing.T) {
	mnt, _, _ := testMount(t, 16<<20, Options{})
	p := func(s string) string { return filepath.Join(mnt, s) }
	null, loop := unix.Mkdev(1, 3), unix.Mkdev(7, 0)
	if err := unix.Mknod(p("null"), unix.S_IFCHR|0o666, int(null)); err != nil {
		t.Fatalf("mknod c 1 3: %v", err)
	}
	if err := unix.Mknod(p("loop"), unix.S_IFBLK|0o660, int(loop)); err != nil {
		t.Fatalf("mknod b 7 0: %v", err)
	}
	checkInertDevice(t, p("null"), unix.S_IFCHR|0o666, null)
	checkInertDevice(t, p("loop"), unix.S_IFBLK|0o660, loop)

	if err := os.Mkdir(p("d"), 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.Rename(p("null"), p("d/null")); err != nil {
		t.Fatalf("rename: %v", err)
	}
	if err := os.Link(p("d/null"), p("null2")); err != nil {
		t.Fatalf("link: %v", err)
	}
	checkInertDevice(t, p("null2"), unix.S_IFCHR|0o666, null)
	if err := os.Chmod(p("null2"), 0o600); err != nil {
		t.Fatal(err)
	}
	checkInertDevice(t, p("d/null"), unix.S_IFCHR|0o600, null)
	ents, err := os.ReadDir(p("d"))
	if err != nil || len(ents) != 1 || ents[0].Type() != os.ModeDevice|os.ModeCharDevice {
		t.Errorf("readdir: %v %v", ents, err)
	}
	for _, name := range []string{"d/null", "null2", "loop"} {
		if err := os.Remove(p(name)); err != nil {
			t.Errorf("remove %s: %v", name, err)
		}
	}

	os.Chmod(mnt, 0o777)
	if got := asUser(t, "mknod-chr", p("user-null")); got != unix.EPERM {
		t.Errorf("mknod of a device as uid 1000: %v, want EPERM", got)
	}
}

// TestConcurrency hammers one volume from many goroutines (run with -race):
// creates, writes, reads, renames, links, unlinks and readdirs in shared and
// private directories. Afterwards the layer's invariants hold.
func TestConcurrency(t *testing.T) {
	mnt, l, _ := testMount(t, 128<<20, Options{})
	shared := filepath.Join(mnt, "shared")
	os.Mkdir(shared, 0o777)
	var wg sync.WaitGroup
	errs := make(chan error, 64)
	for w := 0; w < 8; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			own := filepath.Join(mnt, fmt.Sprint("w", w))
			if err := os.Mkdir(own, 0o755); err != nil {
				errs <- err
				return
			}
			for i := 0; i < 100; i++ {
				name := filepath.Join(own, fmt.Sprint(i))
				data := bytes.Repeat([]byte{byte(i)}, 1000+i*10)
				if err := os.WriteFile(name, data, 0o644); err != nil {
					errs <- err
					return
				}
				if got, err := os.ReadFile(name); err != nil || !bytes.Equal(got, data) {
					errs <- fmt.Errorf("%s: read back %d bytes, %v", name, len(got), err)
					return
				}
				// Shared directory: races between workers are expected to
				// fail cleanly, never to corrupt anything.
				s := filepath.Join(shared, fmt.Sprint(i%7))
				os.Link(name, s)
				os.Rename(s, s+"r")
				os.Remove(s + "r")
				os.ReadDir(shared)
				if i%3 == 0 {
					os.Remove(name)
				}
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if err := l.CheckInvariants(); err != nil {
		t.Error(err)
	}
}
