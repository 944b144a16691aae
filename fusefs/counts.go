package fusefs

import (
	"encoding/binary"
	"fmt"
	"os"
	"sort"
	"strings"
	"sync/atomic"
)

// CountsFileEnv names an environment variable: when it holds a path, a
// server writes the number of FUSE requests it served, by operation, to
// that file when serving ends (the connection ended, or Stop), one
// "OPERATION COUNT" line each, sorted. bench/run.sh uses it to report
// requests per file; `csi-memfs mount` needs no flag for it.
const CountsFileEnv = "CSI_MEMFS_FUSE_COUNTS"

// opNames are the FUSE operations by opcode (include/uapi/linux/fuse.h).
var opNames = [...]string{
	1: "LOOKUP", 2: "FORGET", 3: "GETATTR", 4: "SETATTR", 5: "READLINK",
	6: "SYMLINK", 8: "MKNOD", 9: "MKDIR", 10: "UNLINK", 11: "RMDIR",
	12: "RENAME", 13: "LINK", 14: "OPEN", 15: "READ", 16: "WRITE",
	17: "STATFS", 18: "RELEASE", 20: "FSYNC", 21: "SETXATTR",
	22: "GETXATTR", 23: "LISTXATTR", 24: "REMOVEXATTR", 25: "FLUSH",
	26: "INIT", 27: "OPENDIR", 28: "READDIR", 29: "RELEASEDIR",
	30: "FSYNCDIR", 31: "GETLK", 32: "SETLK", 33: "SETLKW", 34: "ACCESS",
	35: "CREATE", 36: "INTERRUPT", 37: "BMAP", 38: "DESTROY", 39: "IOCTL",
	40: "POLL", 41: "NOTIFY_REPLY", 42: "BATCH_FORGET", 43: "FALLOCATE",
	44: "READDIRPLUS", 45: "RENAME2", 46: "LSEEK", 47: "COPY_FILE_RANGE",
	48: "SETUPMAPPING", 49: "REMOVEMAPPING", 50: "SYNCFS", 51: "TMPFILE",
	52: "STATX", 53: "COPY_FILE_RANGE_64",
}

// opCounts counts the requests of a connection by opcode, every request
// read from the device, those the file system never sees (FORGET,
// INTERRUPT, INIT) included. Accessed atomically.
type opCounts [len(opNames) + 1]atomic.Uint64

// add counts the request in (its fuse_in_header's opcode); opcodes
// without a name count in the last slot, "OTHER".
func (c *opCounts) add(in []byte) {
	if len(in) < 8 {
		return
	}
	op := binary.LittleEndian.Uint32(in[4:])
	if op >= uint32(len(opNames)) || opNames[op] == "" {
		op = uint32(len(opNames))
	}
	c[op].Add(1)
}

// snapshot returns the counts by operation name, nonzero ones only.
func (c *opCounts) snapshot() map[string]uint64 {
	m := map[string]uint64{}
	for op := range c {
		if v := c[op].Load(); v != 0 {
			name := "OTHER"
			if op < len(opNames) {
				name = opNames[op]
			}
			m[name] = v
		}
	}
	return m
}

// formatCounts renders counts as sorted "OPERATION COUNT" lines.
func formatCounts(m map[string]uint64) string {
	names := make([]string, 0, len(m))
	for name := range m {
		names = append(names, name)
	}
	sort.Strings(names)
	var b strings.Builder
	for _, name := range names {
		fmt.Fprintf(&b, "%s %d\n", name, m[name])
	}
	return b.String()
}

// writeCountsFile writes c to the file CountsFileEnv names, if it names
// one.
func (c *opCounts) writeCountsFile() error {
	path := os.Getenv(CountsFileEnv)
	if path == "" {
		return nil
	}
	return os.WriteFile(path, []byte(formatCounts(c.snapshot())), 0o644)
}

// RequestCounts returns how many FUSE requests of each operation this
// server has read from its connection since it started serving it
// (nonzero counts only; INIT once, in the server that mounted).
func (s *Server) RequestCounts() map[string]uint64 { return s.sess.counts.snapshot() }
