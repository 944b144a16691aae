package fusefs

import (
	"bytes"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"
)

// TestFsx is an fsx-style data integrity run through a real mount: random
// writes, reads, truncates, hole punches, and reads and writes through
// shared mappings, on one file through two descriptors, each result checked
// against an in-memory model of the file.
//
// The client runs in a child process, as a pod would: a process must not
// fault on a mapping its own goroutines serve (the faulting thread cannot
// be preempted, so a garbage collection would wait for it forever).
func TestFsx(t *testing.T) {
	for _, disable := range []bool{false, true} {
		t.Run(fmt.Sprintf("disablePassthrough=%v", disable), func(t *testing.T) {
			mnt, l, _ := testMount(t, 64<<20, Options{DisablePassthrough: disable})
			cmd := exec.Command(helper(t), "-test.run=^$", filepath.Join(mnt, "fsx"))
			cmd.Env = append(os.Environ(), "FUSEFS_TEST_AS=fsx")
			if out, err := cmd.CombinedOutput(); err != nil || string(out) != "0" {
				t.Errorf("fsx: %v\n%s", err, out)
			}
			if err := l.CheckInvariants(); err != nil {
				t.Error(err)
			}
		})
	}
}

// fsx runs ops random operations on path and returns the first mismatch.
func fsx(path string, ops int, rng *rand.Rand) (err error) {
	const maxSize = 1 << 20
	var fds [2]int
	for i := range fds {
		fd, err := unix.Open(path, unix.O_RDWR|unix.O_CREAT, 0o644)
		if err != nil {
			return err
		}
		defer unix.Close(fd)
		fds[i] = fd
	}
	var model []byte
	var log []string
	type failure struct{ error }
	defer func() {
		if f, ok := recover().(failure); ok {
			err = f.error
		}
	}()
	fail := func(format string, args ...any) {
		n := max(len(log)-20, 0)
		msg := fmt.Sprintf("op %d: %s\nlast ops:\n", len(log), fmt.Sprintf(format, args...))
		for _, l := range log[n:] {
			msg += "  " + l + "\n"
		}
		panic(failure{errors.New(msg)})
	}
	for i := 0; i < ops; i++ {
		fd := fds[rng.IntN(2)]
		off := rng.IntN(maxSize)
		n := 1 + rng.IntN(64<<10)
		switch op := rng.IntN(6); op {
		case 0, 1: // write
			data := make([]byte, n)
			for j := range data {
				data[j] = byte(rng.UintN(256))
			}
			log = append(log, fmt.Sprintf("write fd%d %d+%d", fd, off, n))
			if w, err := unix.Pwrite(fd, data, int64(off)); err != nil || w != n {
				fail("pwrite: %d, %v", w, err)
			}
			if end := off + n; end > len(model) {
				model = append(model, make([]byte, end-len(model))...)
			}
			copy(model[off:], data)
		case 2: // read
			log = append(log, fmt.Sprintf("read fd%d %d+%d", fd, off, n))
			buf := make([]byte, n)
			r, err := unix.Pread(fd, buf, int64(off))
			if err != nil {
				fail("pread: %v", err)
			}
			want := []byte{}
			if off < len(model) {
				want = model[off:min(off+n, len(model))]
			}
			if !bytes.Equal(buf[:r], want) {
				fail("read %d bytes at %d, want %d; first difference at %d", r, off, len(want), firstDiff(buf[:r], want))
			}
		case 3: // truncate
			size := rng.IntN(maxSize)
			log = append(log, fmt.Sprintf("truncate %d", size))
			if err := unix.Ftruncate(fd, int64(size)); err != nil {
				fail("ftruncate: %v", err)
			}
			if size < len(model) {
				model = model[:size]
			} else {
				model = append(model, make([]byte, size-len(model))...)
			}
		case 4: // punch a hole
			log = append(log, fmt.Sprintf("punch fd%d %d+%d", fd, off, n))
			if err := unix.Fallocate(fd, unix.FALLOC_FL_PUNCH_HOLE|unix.FALLOC_FL_KEEP_SIZE, int64(off), int64(n)); err != nil {
				fail("punch hole: %v", err)
			}
			for j := off; j < min(off+n, len(model)); j++ {
				model[j] = 0
			}
		case 5: // through a shared mapping
			if len(model) == 0 {
				continue
			}
			moff := rng.IntN(len(model)) &^ 4095
			mlen := min(1+rng.IntN(32<<10), len(model)-moff)
			log = append(log, fmt.Sprintf("mmap fd%d %d+%d", fd, moff, mlen))
			m, err := unix.Mmap(fd, int64(moff), mlen, unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
			if err != nil {
				fail("mmap: %v", err)
			}
			if !bytes.Equal(m, model[moff:moff+mlen]) {
				unix.Munmap(m)
				fail("mapping differs at %d", firstDiff(m, model[moff:moff+mlen]))
			}
			for j := 0; j < mlen; j += 512 {
				m[j] = byte(rng.UintN(256))
				model[moff+j] = m[j]
			}
			unix.Msync(m, unix.MS_SYNC)
			unix.Munmap(m)
		}
	}
	got, rerr := os.ReadFile(path)
	if rerr != nil || !bytes.Equal(got, model) {
		fail("final contents differ (%d vs %d bytes) at %d: %v", len(got), len(model), firstDiff(got, model), rerr)
	}
	return nil
}

func firstDiff(a, b []byte) int {
	for i := range min(len(a), len(b)) {
		if a[i] != b[i] {
			return i
		}
	}
	return min(len(a), len(b))
}
