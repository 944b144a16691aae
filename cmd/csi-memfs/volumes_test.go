package main

import (
	"bytes"
	"encoding/json"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/csi-memfs/csi-memfs/driver"
)

func TestPrintVolumes(t *testing.T) {
	now := time.Date(2026, 11, 22, 12, 0, 0, 0, time.UTC)
	vols := []driver.VolumeInfo{
		{ID: "csi-1", PodNamespace: "team", PodName: "web-0", Image: "registry.local/site:v3",
			PublishedAt: now.Add(-90 * time.Minute), State: "published", BytesUsed: 3 << 20, BytesLimit: 256 << 20,
			InodesUsed: 12, InodesLimit: 65536, Seal: []string{"etc/*.yaml"}, SealViolations: 2},
		{ID: "csi-2", PublishedAt: now.Add(-30 * time.Second), State: "lost", BytesUsed: 512, BytesLimit: 1536 << 10,
			InodesUsed: 1, InodesLimit: 1024},
	}
	var out bytes.Buffer
	printVolumes(&out, vols, now)
	want := []string{
		"VOLUME  POD         IMAGE                   USED  LIMIT  INODES    SEALS                   AGE  STATE",
		"csi-1   team/web-0  registry.local/site:v3  3Mi   256Mi  12/65536  etc/*.yaml (2 refused)  1h   published",
		"csi-2   -           -                       512   1.5Mi  1/1024    -                       30s  lost",
	}
	if got := strings.Split(strings.TrimSpace(out.String()), "\n"); strings.Join(got, "\n") != strings.Join(want, "\n") {
		t.Errorf("got:\n%s\nwant:\n%s", strings.Join(got, "\n"), strings.Join(want, "\n"))
	}
}

func TestFetchVolumes(t *testing.T) {
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.URL.Path != "/volumes" {
			http.NotFound(w, r)
			return
		}
		json.NewEncoder(w).Encode([]driver.VolumeInfo{{ID: "csi-1", State: "published"}})
	}))
	defer srv.Close()
	vols, _, err := fetchVolumes(strings.TrimPrefix(srv.URL, "http://"))
	if err != nil || len(vols) != 1 || vols[0].ID != "csi-1" {
		t.Errorf("fetch: %+v, %v", vols, err)
	}
	srv.Close()
	if _, _, err := fetchVolumes(strings.TrimPrefix(srv.URL, "http://")); err == nil || !strings.Contains(err.Error(), "is the plugin running") {
		t.Errorf("fetch from a stopped plugin: %v", err)
	}
}
