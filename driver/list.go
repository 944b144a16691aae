package driver

import (
	"encoding/json"
	"net/http"
	"sort"
	"time"
)

// VolumeInfo describes one volume as `csi-memfs volumes` shows it; the
// plugin serves the list as JSON on /volumes of its metrics address.
type VolumeInfo struct {
	ID           string    `json:"id"`
	PodNamespace string    `json:"podNamespace,omitempty"`
	PodName      string    `json:"podName,omitempty"`
	Image        string    `json:"image,omitempty"`
	ImageDigest  string    `json:"imageDigest,omitempty"`
	PublishedAt  time.Time `json:"publishedAt"`
	// State is "published", or "lost" for a volume whose FUSE server died
	// with a previous plugin process.
	State    string `json:"state"`
	ReadOnly bool   `json:"readOnly,omitempty"`
	// KernelCache says the kernel opens and caches the volume's files
	// without asking the plugin (the kernelCache attribute).
	KernelCache    bool     `json:"kernelCache,omitempty"`
	BytesUsed      uint64   `json:"bytesUsed"`
	BytesLimit     uint64   `json:"bytesLimit"`
	InodesUsed     uint64   `json:"inodesUsed"`
	InodesLimit    uint64   `json:"inodesLimit"`
	CopiedUpBytes  uint64   `json:"copiedUpBytes,omitempty"`
	Seal           []string `json:"seal,omitempty"`
	SealViolations uint64   `json:"sealViolations,omitempty"`
	Passthrough    bool     `json:"passthrough"`
	// Degraded lists why the volume is degraded (no_passthrough,
	// no_resend), as csi_memfs_volume_degraded does.
	Degraded []string `json:"degraded,omitempty"`
}

// Volumes lists the volumes the plugin serves or holds, oldest first, with
// the same numbers as the metrics.
func (d *Driver) Volumes() []VolumeInfo {
	var out []VolumeInfo
	for _, e := range d.vols.snapshot() {
		s, ok := e.sample()
		if !ok {
			continue // being unpublished
		}
		info := VolumeInfo{
			ID:             e.id(),
			PodNamespace:   e.rec.Pod.Namespace,
			PodName:        e.rec.Pod.Name,
			Image:          e.rec.Spec.Params.Image,
			ImageDigest:    e.rec.ImageDigest,
			PublishedAt:    e.rec.PublishedAt,
			State:          "published",
			ReadOnly:       e.rec.Spec.ReadOnly,
			KernelCache:    e.rec.Spec.Params.KernelCache,
			BytesUsed:      s.u.BytesUsed,
			BytesLimit:     s.u.BytesLimit,
			InodesUsed:     s.u.InodesUsed,
			InodesLimit:    s.u.InodesLimit,
			CopiedUpBytes:  s.u.CopiedUpBytes,
			Seal:           e.rec.Spec.Params.Seal,
			SealViolations: s.sealViolations,
			Passthrough:    s.passthrough,
			Degraded:       s.degraded,
		}
		if e.lost {
			info.State = "lost"
		}
		out = append(out, info)
	}
	sort.Slice(out, func(i, j int) bool { return out[i].PublishedAt.Before(out[j].PublishedAt) })
	return out
}

// serveVolumes answers /volumes with Volumes as JSON.
func (d *Driver) serveVolumes(w http.ResponseWriter, _ *http.Request) {
	w.Header().Set("Content-Type", "application/json")
	json.NewEncoder(w).Encode(d.Volumes())
}
