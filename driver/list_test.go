package driver

import (
	"encoding/json"
	"net/http"
	"os"
	"path/filepath"
	"testing"
)

// TestVolumesList: /volumes lists a published volume with the numbers df
// shows and forgets it once unpublished.
func TestVolumesList(t *testing.T) {
	env := startDriver(t, nil)
	target := env.publish(t, "vol-list", attrs("size", "8Mi", "seal", "etc/*.yaml"))
	if err := os.WriteFile(filepath.Join(target, "data"), make([]byte, 1<<20), 0o644); err != nil {
		t.Fatal(err)
	}
	list := func() []VolumeInfo {
		resp, err := http.Get(env.metrics + "/volumes")
		if err != nil {
			t.Fatal(err)
		}
		defer resp.Body.Close()
		var vols []VolumeInfo
		if err := json.NewDecoder(resp.Body).Decode(&vols); err != nil {
			t.Fatal(err)
		}
		return vols
	}
	vols := list()
	if len(vols) != 1 {
		t.Fatalf("listed %d volumes, want 1: %+v", len(vols), vols)
	}
	v := vols[0]
	if v.ID != "vol-list" || v.State != "published" || v.BytesLimit != 8<<20 || v.BytesUsed < 1<<20 ||
		v.InodesUsed < 2 || len(v.Seal) != 1 || v.Seal[0] != "etc/*.yaml" || v.PublishedAt.IsZero() {
		t.Errorf("listed %+v", v)
	}
	env.unpublish(t, "vol-list", target)
	if vols := list(); len(vols) != 0 {
		t.Errorf("after unpublish: %+v", vols)
	}
}
