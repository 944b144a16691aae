package main

import (
	"io"
	"strings"
	"testing"
)

func TestParseServeFlags(t *testing.T) {
	t.Setenv("NODE_NAME", "")
	cfg, err := parseServeFlags([]string{"--node-id", "n1", "--node-memory-budget", "8Gi", "--default-volume-size", "32Mi",
		"--max-volumes", "100", "--endpoint", "unix:///tmp/x.sock"}, io.Discard)
	if err != nil {
		t.Fatal(err)
	}
	if cfg.NodeID != "n1" || cfg.NodeBudget != 8<<30 || cfg.DefaultVolumeSize != 32<<20 || cfg.MaxVolumes != 100 ||
		cfg.Endpoint != "unix:///tmp/x.sock" || cfg.StateDir != "/var/lib/csi-memfs" || cfg.MetricsAddress != ":9809" ||
		cfg.DriverName != "memfs.csi.dev" || cfg.MaxVolumeSize != 0 {
		t.Errorf("cfg = %+v", cfg)
	}
	t.Setenv("NODE_NAME", "from-env")
	if cfg, err := parseServeFlags(nil, io.Discard); err != nil || cfg.NodeID != "from-env" || cfg.DefaultVolumeSize != 64<<20 {
		t.Errorf("defaults: %+v, %v", cfg, err)
	}
	t.Setenv("NODE_NAME", "")
	for _, args := range [][]string{
		{}, // no node id
		{"--node-id", "n", "--node-memory-budget", "lots"}, // not a quantity
		{"--node-id", "n", "extra"},
	} {
		if _, err := parseServeFlags(args, io.Discard); err == nil {
			t.Errorf("%s: no error", strings.Join(args, " "))
		}
	}
}
