// Command sealtool reads and sets the seals of files on a csi-memfs volume
// through the user.memfs.seals extended attribute, for the e2e workload
// image (busybox has no setfattr).
//
//	sealtool FILE              print FILE's seals
//	sealtool FILE SEALS        add SEALS (e.g. write,grow,shrink,seal)
//
// Errors print the errno name, so a test can tell EPERM from EBUSY.
package main

import (
	"errors"
	"fmt"
	"os"
	"syscall"

	"golang.org/x/sys/unix"
)

const attr = "user.memfs.seals"

func main() {
	if len(os.Args) < 2 || len(os.Args) > 3 {
		fmt.Fprintln(os.Stderr, "usage: sealtool FILE [SEALS]")
		os.Exit(2)
	}
	file := os.Args[1]
	if len(os.Args) == 3 {
		if err := unix.Setxattr(file, attr, []byte(os.Args[2]), 0); err != nil {
			fail("setxattr", err)
		}
	}
	buf := make([]byte, 256)
	n, err := unix.Getxattr(file, attr, buf)
	if err != nil {
		fail("getxattr", err)
	}
	fmt.Println(string(buf[:n]))
}

func fail(op string, err error) {
	var errno syscall.Errno
	if errors.As(err, &errno) {
		fmt.Fprintf(os.Stderr, "%s: %s (%v)\n", op, unix.ErrnoName(errno), err)
	} else {
		fmt.Fprintf(os.Stderr, "%s: %v\n", op, err)
	}
	os.Exit(1)
}
