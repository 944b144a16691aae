// Command csi-memfs is the csi-memfs node plugin and its tools.
//
//	csi-memfs mount [flags] MOUNTPOINT   serve one memory volume on a directory
//	csi-memfs serve [flags]              the CSI node plugin
//	csi-memfs volumes [flags]            the volumes of the running plugin
//	csi-memfs hold [flags]               keep the plugin's FUSE connections across its restarts
package main

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
)

// command is one subcommand: run gets the arguments after its name and
// returns the exit code (2 for usage errors).
type command struct {
	name, summary string
	run           func(args []string) int
}

var commands = []command{
	{"mount", "mount a memory volume on a local directory and serve it in the foreground", runMount},
	{"serve", "run the CSI node plugin (kubelet talks to it over a unix socket)", runServe},
	{"volumes", "list the volumes of the plugin running on this node", runVolumes},
	{"hold", "keep the plugin's FUSE connections across its restarts (a sidecar)", runHold},
}

func main() {
	os.Exit(run(os.Args[1:], os.Stderr))
}

func run(args []string, stderr io.Writer) int {
	if len(args) == 0 || args[0] == "-h" || args[0] == "--help" || args[0] == "help" {
		usage(stderr)
		if len(args) == 0 {
			return 2
		}
		return 0
	}
	if args[0] == "--version" || args[0] == "version" {
		fmt.Println(versionString())
		return 0
	}
	for _, c := range commands {
		if c.name == args[0] {
			return c.run(args[1:])
		}
	}
	fmt.Fprintf(stderr, "csi-memfs: unknown command %q (try: csi-memfs --help)\n", args[0])
	return 2
}

func usage(w io.Writer) {
	fmt.Fprintf(w, "csi-memfs: memory volumes with a writable tmpfs layer, served over FUSE.\n\nUsage:\n")
	for _, c := range commands {
		fmt.Fprintf(w, "  csi-memfs %-7s %s\n", c.name, c.summary)
	}
	fmt.Fprintf(w, "  csi-memfs %-7s %s\n", "version", "print the version (also --version)")
	fmt.Fprintf(w, "\nRun 'csi-memfs COMMAND --help' for a command's flags.\n")
}

// flagsDone handles the error of a subcommand's flag parsing: --help ends
// it with status 0, a bad flag with one line and status 2.
func flagsDone(cmd string, err error) (code int, done bool) {
	switch {
	case errors.Is(err, flag.ErrHelp):
		return 0, true
	case err != nil:
		fmt.Fprintf(os.Stderr, "csi-memfs %s: %v\n", cmd, err)
		return 2, true
	}
	return 0, false
}
