package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"
	"time"

	"k8s.io/klog/v2"

	"github.com/csi-memfs/csi-memfs/fusefs"
	"github.com/csi-memfs/csi-memfs/handoff"
)

// defaultStateDir is the default --state-dir of serve and hold, which must
// agree: the plugin finds the holder's socket there.
const defaultStateDir = "/var/lib/csi-memfs"

// holderSocket is the holder's socket in the state directory.
const holderSocket = "holder.sock"

type holdFlags struct {
	stateDir string
	deadline time.Duration
}

// parseHoldFlags parses the hold command's arguments. klog's flags (-v,
// ...) are registered on the same set.
func parseHoldFlags(args []string, out io.Writer) (holdFlags, error) {
	var f holdFlags
	fs := flag.NewFlagSet("csi-memfs hold", flag.ContinueOnError)
	fs.SetOutput(out)
	fs.StringVar(&f.stateDir, "state-dir", defaultStateDir, "the plugin's state directory; the holder listens on "+holderSocket+" in it")
	fs.DurationVar(&f.deadline, "deadline", 2*time.Minute, "how long no plugin may be connected before FUSE requests are answered with EIO (0: callers wait for the plugin however long it takes)")
	logFlags(fs)
	fs.Usage = func() {
		fmt.Fprintf(out, `Usage: csi-memfs hold [flags]

Keeps a copy of every FUSE connection of the plugin (csi-memfs serve), so
that a plugin that crashes or is OOM-killed finds its volumes still mounted
when it restarts. Run it as a second container of the plugin's pod. It
serves <state-dir>/%s until SIGTERM or SIGINT, and never reads the
connections, except when no plugin has been connected for --deadline: it
then answers their requests with EIO, so that no application hangs while
the plugin is crash-looping, until a plugin connects again.

Give it no liveness probe: a holder that restarts starts empty (a running
plugin gives it its connections again), and while the plugin is down the
holder's copy is the only one, so its volumes would be lost.

Flags:
`, holderSocket)
		fs.PrintDefaults()
	}
	if err := fs.Parse(args); err != nil {
		return f, err
	}
	if fs.NArg() > 0 {
		return f, fmt.Errorf("unexpected argument %q (see --help)", fs.Arg(0))
	}
	if f.deadline < 0 {
		return f, errors.New("--deadline must not be negative")
	}
	return f, nil
}

func runHold(args []string) int {
	f, err := parseHoldFlags(args, os.Stderr)
	if code, done := flagsDone("hold", err); done {
		return code
	}
	defer klog.Flush()
	if err := os.MkdirAll(f.stateDir, 0o700); err != nil {
		klog.ErrorS(err, "Cannot start")
		return 1
	}
	h, err := handoff.NewHolder(filepath.Join(f.stateDir, holderSocket))
	if err != nil {
		klog.ErrorS(err, "Cannot start")
		return 1
	}
	h.Deadline, h.Fallback = f.deadline, fusefs.Refuse
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	err = h.Serve(ctx)
	// Our copies go with the process. A mount whose server holds its own
	// copy stays; one of which we held the last copy is aborted.
	klog.InfoS("Stopped; letting go of the sessions held", "bundles", h.Len())
	h.Close()
	if err != nil {
		klog.ErrorS(err, "Serving failed")
		return 1
	}
	return 0
}
