package driver

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/container-storage-interface/spec/lib/go/csi"
	"golang.org/x/sys/unix"

	"github.com/csi-memfs/csi-memfs/handoff"
)

// startHolder runs `csi-memfs hold` on root's state directory and waits
// until its socket answers.
func startHolder(t *testing.T, root string) *exec.Cmd {
	t.Helper()
	state := filepath.Join(root, "state")
	os.MkdirAll(state, 0o700)
	logf, err := os.OpenFile(filepath.Join(root, "hold.log"), os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(serveBinary(t), "hold", "--state-dir", state, "-v", "2")
	cmd.Stdout, cmd.Stderr = logf, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(unix.SIGTERM)
		cmd.Wait()
		logf.Close()
	})
	sock := filepath.Join(state, holderSocket)
	for start := time.Now(); ; time.Sleep(20 * time.Millisecond) {
		if c, err := handoff.Dial(sock); err == nil {
			c.Close()
			return cmd
		}
		if time.Since(start) > 10*time.Second {
			t.Fatal("the holder does not answer")
		}
	}
}

// waitMetric waits until the serve process p reports series name (with
// labels) at value want.
func waitMetric(t *testing.T, p *serveProc, want float64, name string, labels ...string) {
	t.Helper()
	for start := time.Now(); ; time.Sleep(50 * time.Millisecond) {
		if text, err := tryScrape("http://" + p.metrics); err == nil {
			if v, ok := metricValue(text, name, labels...); ok && v == want {
				return
			}
		}
		if time.Since(start) > 30*time.Second {
			t.Fatalf("%s%v never reached %v", name, labels, want)
		}
	}
}

// busyVolume keeps a writer and a reader busy on one mounted volume and
// records what they saw.
type busyVolume struct {
	target string
	// file is kept open by the writer for the whole test; every record
	// it writes is "<seq>\n", and written counts those acknowledged.
	// wmu is held by the writer across a write and its count, and by
	// check.
	wmu     sync.Mutex
	file    *os.File
	written int
	// scratch gets the same records; it was removed once opened, so only
	// its descriptor (and the kernel's passthrough backing file) keeps it.
	scratch *os.File
	// reader reads file (and, on an image volume, lowerFile) by name
	// again and again, and a mapping of mapped is read and written.
	lowerFile, lowerWant string
	mapped               []byte
	// errs are the errors the workers saw; maxWait is the longest one
	// operation took (the pause an application sees).
	mu      sync.Mutex
	errs    []error
	maxWait time.Duration
}

// newBusyVolume opens the files of a busyVolume on the volume mounted at
// target: the log, the scratch file (removed at once) and the mapping.
func newBusyVolume(t *testing.T, target string) *busyVolume {
	t.Helper()
	b := &busyVolume{target: target}
	var err error
	if b.file, err = os.OpenFile(filepath.Join(target, "log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644); err != nil {
		t.Fatal(err)
	}
	if b.scratch, err = os.OpenFile(filepath.Join(target, "scratch"), os.O_RDWR|os.O_CREATE|os.O_APPEND, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(b.scratch.Name()); err != nil {
		t.Fatal(err)
	}
	mf, err := os.OpenFile(filepath.Join(target, "mapped"), os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	mf.Truncate(4096)
	b.mapped, err = unix.Mmap(int(mf.Fd()), 0, 4096, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	mf.Close()
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// close lets go of the volume's files.
func (b *busyVolume) close() {
	b.file.Close()
	b.scratch.Close()
	unix.Munmap(b.mapped)
}

func (b *busyVolume) fail(err error) {
	b.mu.Lock()
	if len(b.errs) < 5 {
		b.errs = append(b.errs, err)
	}
	b.mu.Unlock()
}

func (b *busyVolume) timed(fn func() error) {
	start := time.Now()
	err := fn()
	d := time.Since(start)
	b.mu.Lock()
	if d > b.maxWait {
		b.maxWait = d
	}
	b.mu.Unlock()
	if err != nil {
		b.fail(err)
	}
}

// closed says whether ch is closed.
func closed(ch <-chan struct{}) bool {
	select {
	case <-ch:
		return true
	default:
		return false
	}
}

// run works on the volume until stop is closed.
func (b *busyVolume) run(stop <-chan struct{}, wg *sync.WaitGroup) {
	wg.Add(2)
	go func() { // the writer
		defer wg.Done()
		for !closed(stop) {
			var err error
			b.wmu.Lock()
			b.timed(func() error {
				if _, err = fmt.Fprintf(b.file, "%d\n", b.written+1); err == nil {
					_, err = fmt.Fprintf(b.scratch, "%d\n", b.written+1)
				}
				return err
			})
			if err == nil {
				b.written++
				binaryPut(b.mapped, b.written)
			}
			b.wmu.Unlock()
			if err != nil {
				return
			}
			time.Sleep(time.Millisecond)
		}
	}()
	go func() { // the reader
		defer wg.Done()
		for !closed(stop) {
			b.timed(func() error {
				if _, err := os.ReadFile(b.file.Name()); err != nil {
					return err
				}
				if b.lowerFile != "" {
					got, err := os.ReadFile(b.lowerFile)
					if err == nil && string(got) != b.lowerWant {
						err = fmt.Errorf("%s reads %q, want %q", b.lowerFile, got, b.lowerWant)
					}
					return err
				}
				var st unix.Statfs_t
				return unix.Statfs(b.target, &st)
			})
			time.Sleep(2 * time.Millisecond)
		}
	}()
}

// binaryPut stores n in the first 8 bytes of a mapping.
func binaryPut(m []byte, n int) {
	for i := range 8 {
		m[i] = byte(n >> (8 * i))
	}
}

// check verifies every record written is there, in order, and that the
// open descriptor and the mapping still work.
func (b *busyVolume) check(t *testing.T, phase string) {
	t.Helper()
	b.mu.Lock()
	errs, maxWait := b.errs, b.maxWait
	b.errs, b.maxWait = nil, 0
	b.mu.Unlock()
	for _, err := range errs {
		t.Errorf("%s: %s: %v", phase, b.target, err)
		if errors.Is(err, syscall.ENOTCONN) {
			t.Errorf("%s: ENOTCONN", phase)
		}
	}
	b.wmu.Lock()
	defer b.wmu.Unlock()
	var want bytes.Buffer
	for i := 1; i <= b.written; i++ {
		fmt.Fprintf(&want, "%d\n", i)
	}
	got, err := os.ReadFile(b.file.Name())
	if err != nil || !bytes.Equal(got, want.Bytes()) {
		t.Errorf("%s: %s holds %d bytes (%v), want the %d records written (%d bytes)", phase, b.file.Name(), len(got), err, b.written, want.Len())
	}
	var st unix.Stat_t
	if err := unix.Fstat(int(b.file.Fd()), &st); err != nil || st.Size != int64(want.Len()) {
		t.Errorf("%s: fstat of the writer's descriptor: size %d, %v", phase, st.Size, err)
	}
	got = make([]byte, want.Len()+1)
	n, _ := b.scratch.ReadAt(got, 0)
	if !bytes.Equal(got[:n], want.Bytes()) {
		t.Errorf("%s: %s's removed scratch file holds %d bytes, want the %d records written (%d bytes)", phase, b.target, n, b.written, want.Len())
	}
	if err := unix.Fstat(int(b.scratch.Fd()), &st); err != nil || st.Size != int64(want.Len()) || st.Nlink != 0 {
		t.Errorf("%s: fstat of the removed scratch file: size %d, nlink %d, %v", phase, st.Size, st.Nlink, err)
	}
	if n := int(b.mapped[0]) | int(b.mapped[1])<<8 | int(b.mapped[2])<<16; n != b.written&0xffffff {
		t.Errorf("%s: the mapping holds %d, want %d", phase, n, b.written)
	}
	b.mu.Lock()
	b.maxWait = max(b.maxWait, maxWait)
	b.mu.Unlock()
}

// TestTakeoverKeepsBusyVolumes is issue 7's test: 20 volumes (memory and
// image), each with a writer, a reader and a shared mapping busy on it, go
// through a planned handover to a new serve process, then a SIGKILL of
// that process and a recovery by a third from the holder. After each:
// every mount answers, no ENOTCONN or other error was seen, every byte
// written is there, open descriptors and mappings work. It logs the
// longest operation of each phase: the pause applications saw.
func TestTakeoverKeepsBusyVolumes(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	os.Chmod(root, 0o755)
	ctx := context.Background()
	reg := newTestRegistry(t)
	ref := reg.push("app:v1", buildImage(t, layer(t, dirEntry("etc"), fileEntry("etc/app.conf", "from the image\n"))))

	startHolder(t, root)
	p1 := startServe(t, root)
	conn := dial(t, p1.endpoint)
	node := csi.NewNodeClient(conn)

	const n = 20
	vols := make([]*busyVolume, n)
	for i := range vols {
		id := fmt.Sprintf("vol-%02d", i)
		dir := filepath.Join(root, "pods", id)
		os.MkdirAll(dir, 0o755)
		target := filepath.Join(dir, "mount")
		a := attrs("size", "8Mi")
		if i%2 == 1 {
			a = attrs("size", "8Mi", "image", ref)
		}
		if _, err := node.NodePublishVolume(ctx, pubReq(id, target, a)); err != nil {
			t.Fatalf("publish %s: %v", id, err)
		}
		b := newBusyVolume(t, target)
		if i%2 == 1 {
			b.lowerFile, b.lowerWant = filepath.Join(target, "etc", "app.conf"), "from the image\n"
		}
		vols[i] = b
	}
	conn.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, b := range vols {
		b.run(stop, &wg)
	}
	stopped := false
	halt := func() {
		if !stopped {
			stopped = true
			close(stop)
			wg.Wait()
		}
	}
	defer halt()
	pauses := func() time.Duration {
		var m time.Duration
		for _, b := range vols {
			b.mu.Lock()
			m = max(m, b.maxWait)
			b.maxWait = 0
			b.mu.Unlock()
		}
		return m
	}
	time.Sleep(300 * time.Millisecond)
	pauses()

	// A planned handover: a second process starts beside the first.
	p2 := startServe(t, root)
	waitMetric(t, p2, 1, "csi_memfs_takeovers_total", `from="handover"`)
	waitMetric(t, p2, n, "csi_memfs_volumes_recovered_total")
	time.Sleep(300 * time.Millisecond)
	p1.cmd.Process.Signal(unix.SIGTERM)
	if err := p1.cmd.Wait(); err != nil {
		t.Errorf("the handed-over process exited with %v", err)
	}
	time.Sleep(200 * time.Millisecond)
	handover := pauses()
	for _, b := range vols {
		b.check(t, "after the handover")
	}
	if v, _ := metricValue(scrape(t, "http://"+p2.metrics), "csi_memfs_volumes_lost_total"); v != 0 {
		t.Errorf("volumes lost in the handover: %v", v)
	}

	// A crash: the serving process is killed; a new one recovers the
	// volumes from the holder.
	p2.cmd.Process.Kill()
	p2.cmd.Wait()
	time.Sleep(100 * time.Millisecond)
	p3 := startServe(t, root)
	waitMetric(t, p3, 1, "csi_memfs_takeovers_total", `from="holder"`)
	waitMetric(t, p3, n, "csi_memfs_volumes_recovered_total")
	time.Sleep(300 * time.Millisecond)
	halt()
	crash := pauses()
	for _, b := range vols {
		b.check(t, "after the crash")
	}
	t.Logf("longest application operation: %v across the planned handover, %v across the SIGKILL and recovery (20 busy volumes)", handover, crash)

	// Everything unpublishes cleanly from the third process.
	conn = dial(t, p3.endpoint)
	defer conn.Close()
	node = csi.NewNodeClient(conn)
	for i, b := range vols {
		b.close()
		if _, err := node.NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("vol-%02d", i), TargetPath: b.target}); err != nil {
			t.Errorf("unpublish: %v", err)
		}
	}
	if left := mountsUnder(t, root); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
	c, err := handoff.Dial(filepath.Join(root, "state", holderSocket))
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	held, err := c.List()
	if err != nil {
		t.Fatal(err)
	}
	var ids []string
	for _, b := range held {
		ids = append(ids, b.ID)
		b.Close()
	}
	if len(ids) > 0 {
		slices.Sort(ids)
		t.Errorf("the holder still holds %s", strings.Join(ids, " "))
	}
}

// fdCount counts the open descriptors of process pid.
func fdCount(t *testing.T, pid int) int {
	t.Helper()
	es, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", pid))
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// settledFdCount is fdCount once it has stayed the same for 200 ms: a
// connection a client just closed (startHolder's probe, a plugin's link)
// is not counted while the process has yet to notice.
func settledFdCount(t *testing.T, pid int) int {
	t.Helper()
	n := fdCount(t, pid)
	for start := time.Now(); time.Since(start) < 5*time.Second; {
		time.Sleep(200 * time.Millisecond)
		m := fdCount(t, pid)
		if m == n {
			break
		}
		n = m
	}
	return n
}

// fuseConnections counts the kernel's FUSE connections (fusectl).
func fuseConnections(t *testing.T) int {
	t.Helper()
	if _, err := os.Stat("/sys/fs/fuse/connections/"); err != nil {
		t.Skip("fusectl is not mounted")
	}
	es, _ := os.ReadDir("/sys/fs/fuse/connections")
	return len(es)
}

// TestCrashLoopLeaksNothing kills the serving process every second, ten
// times, while volumes are written to, and checks that every restart
// recovers every volume and that nothing piles up: mounts, tmpfs
// instances, FUSE connections, the holder's descriptors, journal records.
func TestCrashLoopLeaksNothing(t *testing.T) {
	if os.Getenv("CSI_MEMFS_SLOW") == "" {
		t.Skip("about 20 s; make test-slow runs it (CSI_MEMFS_SLOW=1)")
	}
	requireFUSE(t)
	if mounted, _ := os.ReadFile("/proc/self/mounts"); !bytes.Contains(mounted, []byte("fusectl")) {
		unix.Mount("none", "/sys/fs/fuse/connections", "fusectl", 0, "")
	}
	root := t.TempDir()
	os.Chmod(root, 0o755)
	ctx := context.Background()
	holder := startHolder(t, root)
	conns0, holderFds0 := fuseConnections(t), settledFdCount(t, holder.Process.Pid)

	p := startServe(t, root)
	conn := dial(t, p.endpoint)
	const n = 3
	vols := make([]*busyVolume, n)
	for i := range vols {
		id := fmt.Sprintf("vol-%d", i)
		os.MkdirAll(filepath.Join(root, "pods", id), 0o755)
		target := filepath.Join(root, "pods", id, "mount")
		if _, err := csi.NewNodeClient(conn).NodePublishVolume(ctx, pubReq(id, target, attrs("size", "4Mi"))); err != nil {
			t.Fatal(err)
		}
		vols[i] = newBusyVolume(t, target)
	}
	conn.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for _, b := range vols {
		b.run(stop, &wg)
	}
	// Settled counts, with the volumes published and one server running.
	time.Sleep(200 * time.Millisecond)
	conns1, holderFds1 := fuseConnections(t), settledFdCount(t, holder.Process.Pid)
	if conns1 != conns0+n {
		t.Errorf("%d FUSE connections with %d volumes, %d before", conns1, n, conns0)
	}

	for i := range 10 {
		p.cmd.Process.Kill()
		p.cmd.Wait()
		p = startServe(t, root)
		waitMetric(t, p, n, "csi_memfs_volumes_recovered_total")
		if v, _ := metricValue(scrape(t, "http://"+p.metrics), "csi_memfs_volumes_lost_total"); v != 0 {
			t.Fatalf("restart %d: %v volumes lost", i+1, v)
		}
		time.Sleep(time.Second)
	}
	close(stop)
	wg.Wait()
	for _, b := range vols {
		b.check(t, "after ten crashes")
	}
	if got := fuseConnections(t); got != conns1 {
		t.Errorf("%d FUSE connections after the crashes, want %d", got, conns1)
	}
	if got := settledFdCount(t, holder.Process.Pid); got != holderFds1 {
		t.Errorf("the holder has %d descriptors open after the crashes, %d before", got, holderFds1)
	}
	var tmpfs int
	mounts, _ := os.ReadFile("/proc/self/mounts")
	for _, line := range strings.Split(string(mounts), "\n") {
		if strings.Contains(line, root) && strings.HasPrefix(line, "memfs ") {
			tmpfs++
		}
	}
	if tmpfs != n {
		t.Errorf("%d tmpfs instances under the state directory, want %d", tmpfs, n)
	}
	if es, _ := os.ReadDir(filepath.Join(root, "state", "volumes")); len(es) != n {
		t.Errorf("%d journal records, want %d", len(es), n)
	}
	if left := mountsUnder(t, filepath.Join(root, "pods")); len(left) != n {
		t.Errorf("target mounts: %v, want %d", left, n)
	}

	conn = dial(t, p.endpoint)
	defer conn.Close()
	for i, b := range vols {
		b.close()
		if _, err := csi.NewNodeClient(conn).NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: fmt.Sprintf("vol-%d", i), TargetPath: b.target}); err != nil {
			t.Errorf("unpublish: %v", err)
		}
	}
	if left := mountsUnder(t, root); len(left) > 0 {
		t.Errorf("mounts left: %v", left)
	}
	// The holder lets go of the connections at unpublish.
	for start := time.Now(); fuseConnections(t) != conns0 && time.Since(start) < 5*time.Second; {
		time.Sleep(50 * time.Millisecond)
	}
	if got := fuseConnections(t); got != conns0 {
		t.Errorf("%d FUSE connections after unpublishing everything, %d before", got, conns0)
	}
	// With the plugin gone too, the holder is back where it started.
	p.cmd.Process.Signal(unix.SIGTERM)
	p.cmd.Wait()
	for start := time.Now(); fdCount(t, holder.Process.Pid) != holderFds0 && time.Since(start) < 5*time.Second; {
		time.Sleep(50 * time.Millisecond)
	}
	if got := fdCount(t, holder.Process.Pid); got != holderFds0 {
		t.Errorf("the holder has %d descriptors open after unpublishing everything, %d before", got, holderFds0)
	}
}

// TestStoppedPluginWaitsForSuccessor: a plugin told to stop with
// --handover-wait (a deleted plugin pod) gives its volumes to a successor
// started meanwhile, and its volume goes on working with no holder.
func TestStoppedPluginWaitsForSuccessor(t *testing.T) {
	requireFUSE(t)
	root := t.TempDir()
	os.Chmod(root, 0o755)
	ctx := context.Background()
	p1 := startServe(t, root, "--handover-wait", "20s")
	conn := dial(t, p1.endpoint)
	os.MkdirAll(filepath.Join(root, "pods", "v"), 0o755)
	target := filepath.Join(root, "pods", "v", "mount")
	if _, err := csi.NewNodeClient(conn).NodePublishVolume(ctx, pubReq("vol-w", target, attrs("size", "4Mi"))); err != nil {
		t.Fatal(err)
	}
	conn.Close()
	f, err := os.OpenFile(filepath.Join(target, "log"), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	f.WriteString("before\n")

	p1.cmd.Process.Signal(unix.SIGTERM)
	time.Sleep(200 * time.Millisecond) // it waits, still serving
	f.WriteString("waiting\n")
	p2 := startServe(t, root)
	waitMetric(t, p2, 1, "csi_memfs_volumes_recovered_total")
	if err := p1.cmd.Wait(); err != nil {
		t.Errorf("the stopped process exited with %v", err)
	}
	if _, err := f.WriteString("after\n"); err != nil {
		t.Fatalf("write after the handover: %v", err)
	}
	if got, err := os.ReadFile(f.Name()); err != nil || string(got) != "before\nwaiting\nafter\n" {
		t.Errorf("read back %q, %v", got, err)
	}
	conn = dial(t, p2.endpoint)
	defer conn.Close()
	f.Close()
	if _, err := csi.NewNodeClient(conn).NodeUnpublishVolume(ctx, &csi.NodeUnpublishVolumeRequest{VolumeId: "vol-w", TargetPath: target}); err != nil {
		t.Errorf("unpublish: %v", err)
	}
}
