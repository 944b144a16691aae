package driver

import (
	"github.com/go-logr/logr"

	"github.com/csi-memfs/csi-memfs/volume"
)

// Reasons a volume is degraded (docs/restart.md): it is served, but not as
// the operator asked or without the restart guarantees.
const (
	// degradedNoPassthrough: passthrough was wanted (no --no-passthrough)
	// and the kernel refused it (Linux < 6.9, no CAP_SYS_ADMIN, a backing
	// file system it cannot stack on): the plugin moves every byte, and
	// the volume's pages are charged to the plugin, not the pod.
	degradedNoPassthrough = "no_passthrough"
	// degradedNoResend: the kernel lacks FUSE_NOTIFY_RESEND (Linux < 6.9):
	// when the plugin dies, a caller whose request it had read waits,
	// unkillable, until the connection ends.
	degradedNoResend = "no_resend"
)

// degradedReasons says why a volume is degraded, if it is: wanted and
// active are its passthrough as asked and as it is, resend whether its
// kernel can resend a dead server's requests.
func degradedReasons(wanted, active, resend bool) []string {
	var r []string
	if wanted && !active {
		r = append(r, degradedNoPassthrough)
	}
	if !resend {
		r = append(r, degradedNoResend)
	}
	return r
}

// volumeDegraded returns the reasons vol is degraded.
func volumeDegraded(vol *volume.Volume) []string {
	return degradedReasons(vol.PassthroughWanted(), vol.Passthrough(), vol.KernelResend())
}

// warnDegraded logs one line per reason vol, just mounted or adopted, is
// degraded. Passthrough may still turn off at the first open the kernel
// refuses a backing file for: fusefs logs that, and the metrics see it.
//
// logger names the volume (volumeID).
func warnDegraded(logger logr.Logger, vol *volume.Volume) {
	for _, r := range volumeDegraded(vol) {
		logger.Error(nil, "Volume is degraded", "reason", r)
	}
}
