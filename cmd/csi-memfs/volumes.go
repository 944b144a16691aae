package main

import (
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"text/tabwriter"
	"time"

	"github.com/csi-memfs/csi-memfs/driver"
)

// runVolumes prints the volumes of the plugin running on this node, one line
// each, from /volumes of its metrics address.
func runVolumes(args []string) int {
	fs := flag.NewFlagSet("csi-memfs volumes", flag.ContinueOnError)
	fs.SetOutput(io.Discard)
	var addr string
	fs.StringVar(&addr, "metrics-address", "", "the plugin's metrics address HOST:PORT "+
		"(default: the one the plugin recorded in <state-dir>/"+driver.MetricsAddressFile+", else "+defaultVolumesAddress+")")
	fs.StringVar(&addr, "address", "", "deprecated: use --metrics-address")
	stateDir := fs.String("state-dir", defaultStateDir, "the plugin's --state-dir")
	asJSON := fs.Bool("json", false, "print the plugin's JSON instead of a table")
	if err := fs.Parse(args); err != nil {
		if errors.Is(err, flag.ErrHelp) {
			fmt.Fprintf(os.Stdout, "Usage: csi-memfs volumes [--metrics-address HOST:PORT] [--state-dir DIR] [--json]\n\n"+
				"Prints one line per volume of the plugin running on this node: id, pod,\n"+
				"image, memory used and limit, inodes, sealed globs and seal violations, age.\n\nFlags:\n")
			fs.SetOutput(os.Stdout)
			fs.PrintDefaults()
			return 0
		}
		fmt.Fprintf(os.Stderr, "csi-memfs volumes: %v\n", err)
		return 2
	}
	if fs.NArg() > 0 {
		fmt.Fprintf(os.Stderr, "csi-memfs volumes: unexpected argument %q (see --help)\n", fs.Arg(0))
		return 2
	}
	if addr == "" {
		addr = volumesAddress(*stateDir)
	}
	vols, raw, err := fetchVolumes(addr)
	if err != nil {
		fmt.Fprintf(os.Stderr, "csi-memfs volumes: %v\n", err)
		return 1
	}
	if *asJSON {
		os.Stdout.Write(raw)
		return 0
	}
	printVolumes(os.Stdout, vols, time.Now())
	return 0
}

// defaultVolumesAddress is where `volumes` looks for a plugin that
// recorded no address: serve's default --metrics-address.
const defaultVolumesAddress = "127.0.0.1:9809"

// volumesAddress is the metrics address the plugin serving with stateDir
// recorded, or defaultVolumesAddress.
func volumesAddress(stateDir string) string {
	if a, err := driver.ReadMetricsAddress(stateDir); err == nil {
		return a
	}
	return defaultVolumesAddress
}

func fetchVolumes(addr string) ([]driver.VolumeInfo, []byte, error) {
	client := http.Client{Timeout: 10 * time.Second}
	resp, err := client.Get("http://" + addr + "/volumes")
	if err != nil {
		return nil, nil, fmt.Errorf("nothing answers at %s: is the plugin running? (else give its --state-dir or --metrics-address): %w", addr, err)
	}
	defer resp.Body.Close()
	raw, err := io.ReadAll(resp.Body)
	if err != nil {
		return nil, nil, err
	}
	if resp.StatusCode != http.StatusOK {
		return nil, nil, fmt.Errorf("%s/volumes: %s", addr, resp.Status)
	}
	var vols []driver.VolumeInfo
	if err := json.Unmarshal(raw, &vols); err != nil {
		return nil, nil, fmt.Errorf("%s/volumes: %w", addr, err)
	}
	return vols, raw, nil
}

func printVolumes(w io.Writer, vols []driver.VolumeInfo, now time.Time) {
	tw := tabwriter.NewWriter(w, 0, 0, 2, ' ', 0)
	fmt.Fprintln(tw, "VOLUME\tPOD\tIMAGE\tUSED\tLIMIT\tINODES\tSEALS\tAGE\tSTATE")
	for _, v := range vols {
		pod := "-"
		if v.PodName != "" {
			pod = v.PodNamespace + "/" + v.PodName
		}
		img := "-"
		if v.Image != "" {
			img = v.Image
		}
		seals := "-"
		if len(v.Seal) > 0 || v.SealViolations > 0 {
			seals = fmt.Sprintf("%s (%d refused)", strings.Join(v.Seal, ","), v.SealViolations)
		}
		state := v.State
		if len(v.Degraded) > 0 {
			state += " DEGRADED(" + strings.Join(v.Degraded, ",") + ")"
		}
		fmt.Fprintf(tw, "%s\t%s\t%s\t%s\t%s\t%d/%d\t%s\t%s\t%s\n", v.ID, pod, img,
			bytesString(v.BytesUsed), bytesString(v.BytesLimit), v.InodesUsed, v.InodesLimit,
			seals, ageString(now.Sub(v.PublishedAt)), state)
	}
	tw.Flush()
}

// bytesString writes n in binary units, as Kubernetes quantities do.
func bytesString(n uint64) string {
	const unit = 1024
	if n < unit {
		return fmt.Sprintf("%d", n)
	}
	v, suffix := float64(n), ""
	for _, s := range []string{"Ki", "Mi", "Gi", "Ti"} {
		if v < unit {
			break
		}
		v, suffix = v/unit, s
	}
	return strings.TrimSuffix(fmt.Sprintf("%.1f", v), ".0") + suffix
}

// ageString writes d as kubectl writes ages: 45s, 12m, 3h, 2d.
func ageString(d time.Duration) string {
	switch {
	case d < time.Minute:
		return fmt.Sprintf("%ds", int(d.Seconds()))
	case d < time.Hour:
		return fmt.Sprintf("%dm", int(d.Minutes()))
	case d < 48*time.Hour:
		return fmt.Sprintf("%dh", int(d.Hours()))
	}
	return fmt.Sprintf("%dd", int(d.Hours()/24))
}
