package driver

import (
	"net/http"
	"net/http/httptest"
	"slices"
	"testing"

	"github.com/csi-memfs/csi-memfs/volume"
)

func TestDegradedReasons(t *testing.T) {
	for _, tc := range []struct {
		wanted, active, resend bool
		want                   []string
	}{
		{true, true, true, nil},
		{false, false, true, nil}, // --no-passthrough: the operator's choice
		{true, false, true, []string{degradedNoPassthrough}},
		{false, false, false, []string{degradedNoResend}},
		{true, false, false, []string{degradedNoPassthrough, degradedNoResend}},
	} {
		if got := degradedReasons(tc.wanted, tc.active, tc.resend); !slices.Equal(got, tc.want) {
			t.Errorf("degradedReasons(wanted %v, active %v, resend %v) = %v, want %v", tc.wanted, tc.active, tc.resend, got, tc.want)
		}
	}
}

// TestDegradedMetrics: each reason of a degraded volume is a series of
// csi_memfs_volume_degraded, and the node counts degraded volumes once
// each. The kernels of CI have passthrough and resend, so the volumes are
// samples here.
func TestDegradedMetrics(t *testing.T) {
	samples := []volumeSample{
		{id: "ok", podNamespace: "ns", podName: "a", passthrough: true},
		{id: "slow", podNamespace: "ns", podName: "b", degraded: degradedReasons(true, false, true)},
		{id: "old", podNamespace: "ns", podName: "c", degraded: degradedReasons(true, false, false)},
		{id: "gone", lost: true},
	}
	m := newMetrics(func() []volumeSample { return samples }, &budget{}, false)
	srv := httptest.NewServer(m.handler(func() error { return nil }, http.NotFound))
	defer srv.Close()
	text := scrape(t, srv.URL)
	for _, tc := range []struct {
		id, reason string
		want       bool
	}{
		{"ok", degradedNoPassthrough, false},
		{"ok", degradedNoResend, false},
		{"slow", degradedNoPassthrough, true},
		{"slow", degradedNoResend, false},
		{"old", degradedNoPassthrough, true},
		{"old", degradedNoResend, true},
		{"gone", degradedNoResend, false},
	} {
		v, ok := metricValue(text, "csi_memfs_volume_degraded", `volume_id="`+tc.id+`"`, `reason="`+tc.reason+`"`)
		if ok != tc.want || (ok && v != 1) {
			t.Errorf("csi_memfs_volume_degraded{volume_id=%q,reason=%q} = %v (present %v), want present %v at 1", tc.id, tc.reason, v, ok, tc.want)
		}
	}
	if v, ok := metricValue(text, "csi_memfs_node_degraded_volumes"); !ok || v != 2 {
		t.Errorf("csi_memfs_node_degraded_volumes = %v (present %v), want 2", v, ok)
	}
}

// TestNoPassthroughIsNotDegraded: a volume served without passthrough
// because the operator said so (--no-passthrough) is not degraded; the
// metrics and /volumes say the same as the volume.
func TestNoPassthroughIsNotDegraded(t *testing.T) {
	env := startDriver(t, func(c *Config) { c.DisablePassthrough = true })
	env.publish(t, "vol-np", attrs())
	text := scrape(t, env.metrics)
	if _, ok := metricValue(text, "csi_memfs_volume_degraded", `reason="`+degradedNoPassthrough+`"`); ok {
		t.Errorf("a --no-passthrough volume counts as degraded:\n%s", text)
	}
	var vol *volume.Volume
	for _, e := range env.d.vols.snapshot() {
		vol = e.vol
	}
	want := 0.0
	if !vol.KernelResend() {
		want = 1
		t.Logf("this kernel has no FUSE_NOTIFY_RESEND")
	}
	if v, ok := metricValue(text, "csi_memfs_node_degraded_volumes"); !ok || v != want {
		t.Errorf("csi_memfs_node_degraded_volumes = %v (present %v), want %v", v, ok, want)
	}
	infos := env.d.Volumes()
	if len(infos) != 1 || len(infos[0].Degraded) != int(want) {
		t.Errorf("Volumes() = %+v", infos)
	}
}
