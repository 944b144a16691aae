package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"errors"
	"io"
	"testing"

	"k8s.io/klog/v2"
)

// TestLoggingFormatJSON: with --logging-format=json every klog call,
// contextual or not, writes one JSON object with its structured keys, at
// klog's verbosity.
func TestLoggingFormatJSON(t *testing.T) {
	defer klog.ClearLogger()
	if _, err := parseServeFlags([]string{"--node-id", "n", "--logging-format", "xml"}, io.Discard); err == nil {
		t.Error("--logging-format=xml: no error")
	}
	if _, err := parseServeFlags([]string{"--node-id", "n", "--logging-format=json", "-v=2"}, io.Discard); err != nil {
		t.Fatal(err)
	}
	var buf bytes.Buffer
	if err := setLogFormat("json", &buf); err != nil {
		t.Fatal(err)
	}
	klog.InfoS("Published volume", "volumeID", "csi-1", "podNamespace", "team", "size", 1<<20)
	klog.Background().WithValues("method", "NodePublishVolume").V(2).Info("Publish refused", "podName", "web-0")
	klog.V(3).InfoS("Hidden at -v=2")
	klog.ErrorS(errors.New("boom"), "Publish failed", "volumeID", "csi-2")
	var lines []map[string]any
	sc := bufio.NewScanner(&buf)
	for sc.Scan() {
		var m map[string]any
		if err := json.Unmarshal(sc.Bytes(), &m); err != nil {
			t.Fatalf("not JSON: %q: %v", sc.Text(), err)
		}
		lines = append(lines, m)
	}
	if len(lines) != 3 {
		t.Fatalf("got %d lines, want 3: %v", len(lines), lines)
	}
	for i, want := range []map[string]any{
		{"msg": "Published volume", "volumeID": "csi-1", "podNamespace": "team", "size": float64(1 << 20)},
		{"msg": "Publish refused", "method": "NodePublishVolume", "podName": "web-0"},
		{"msg": "Publish failed", "volumeID": "csi-2", "err": "boom", "level": "ERROR"},
	} {
		for k, v := range want {
			if lines[i][k] != v {
				t.Errorf("line %d: %s = %v, want %v (line %v)", i, k, lines[i][k], v, lines[i])
			}
		}
	}
	if err := setLogFormat("text", io.Discard); err != nil {
		t.Fatal(err)
	}
}
