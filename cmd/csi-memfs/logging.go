package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"log/slog"
	"os"

	"github.com/go-logr/logr"
	"k8s.io/klog/v2"
)

// logFlags registers klog's flags (-v, ...) and --logging-format on fs.
//
// --logging-format is named and valued as k8s.io/component-base/logs
// names its flag, but is not that package: component-base's JSON format
// brings zap, pflag and the feature-gate machinery into a binary that
// needs one JSON line per log call. Here json is log/slog's JSONHandler,
// made a logr.Logger (logr.FromSlogHandler) and installed as klog's
// logger, so every klog call, contextual or not, writes JSON. Like klog's
// own flags it takes effect as it is parsed.
func logFlags(fs *flag.FlagSet) {
	klog.InitFlags(fs)
	fs.Func("logging-format", "log format: text (klog's) or json (one JSON object a line) (default text)", func(s string) error {
		return setLogFormat(s, os.Stderr)
	})
}

// setLogFormat makes klog write in format (text or json) to w.
func setLogFormat(format string, w io.Writer) error {
	switch format {
	case "text":
		klog.ClearLogger()
	case "json":
		h := slog.NewJSONHandler(w, &slog.HandlerOptions{Level: slog.Level(-128)})
		klog.SetLoggerWithOptions(logr.FromSlogHandler(klogVerbosity{h}), klog.ContextualLogger(true))
	default:
		return fmt.Errorf("want text or json")
	}
	return nil
}

// klogVerbosity leaves the verbosity to klog's -v: logr's V(n) is slog's
// level -n.
type klogVerbosity struct{ slog.Handler }

func (h klogVerbosity) Enabled(ctx context.Context, l slog.Level) bool {
	return l >= slog.LevelInfo || klog.V(klog.Level(-l)).Enabled()
}

func (h klogVerbosity) WithAttrs(as []slog.Attr) slog.Handler {
	return klogVerbosity{h.Handler.WithAttrs(as)}
}

func (h klogVerbosity) WithGroup(name string) slog.Handler {
	return klogVerbosity{h.Handler.WithGroup(name)}
}
