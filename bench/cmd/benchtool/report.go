package main

import (
	"bufio"
	"errors"
	"flag"
	"fmt"
	"math"
	"os"
	"sort"
	"strconv"
	"strings"
)

// The systems measured, in column order.
var systems = []string{"tmpfs", "overlayfs", "fuse-overlayfs", "csi-memfs"}

const (
	tmpfs = "tmpfs"
	ovl   = "overlayfs"
	fovl  = "fuse-overlayfs"
	memfs = "csi-memfs"
)

// metric describes one row of the report.
type metric struct {
	key   string // as in raw.tsv
	label string
	unit  string
	// lower is true when smaller values are better (times); ratios are
	// then reference/value so that > 1 always means faster.
	lower bool
	// noRatio rows (memory) show values only.
	noRatio bool
	// vsFovl adds csi-memfs's ratio to fuse-overlayfs.
	vsFovl bool
	target target
}

// target is what csi-memfs must reach on a row.
type target struct {
	kind string  // "" (none), "ref" (ratio to the table's reference >= x), "fovl" (ratio to fuse-overlayfs >= x), "max" (value <= x)
	x    float64 // threshold
	text string  // as shown
}

// table is one section of the report.
type table struct {
	title   string
	ref     string // reference system for the ratios
	metrics []metric
	note    string
}

// data holds raw values: data[metric][system] = values over rounds.
type data map[string]map[string][]float64

func (d data) median(key, sys string) (float64, bool) {
	v := append([]float64(nil), d[key][sys]...)
	if len(v) == 0 {
		return 0, false
	}
	sort.Float64s(v)
	if len(v)%2 == 1 {
		return v[len(v)/2], true
	}
	return (v[len(v)/2-1] + v[len(v)/2]) / 2, true
}

func (d data) param(key string) float64 {
	v, _ := d.median("param_"+key, "-")
	return v
}

// readRaw parses "round<TAB>metric<TAB>system<TAB>value" lines; values
// that are not numbers (NA after a failure) are skipped.
func readRaw(path string) (data, error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, err
	}
	defer f.Close()
	d := data{}
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fields := strings.Split(sc.Text(), "\t")
		if len(fields) != 4 || strings.HasPrefix(fields[0], "#") {
			continue
		}
		v, err := strconv.ParseFloat(fields[3], 64)
		if err != nil {
			continue
		}
		if d[fields[1]] == nil {
			d[fields[1]] = map[string][]float64{}
		}
		d[fields[1]][fields[2]] = append(d[fields[1]][fields[2]], v)
	}
	return d, sc.Err()
}

func cmdReport(args []string) error {
	fs := flag.NewFlagSet("report", flag.ExitOnError)
	raw := fs.String("raw", "", "raw.tsv written by bench/run.sh")
	fs.Parse(args)
	if *raw == "" {
		return errors.New("need -raw")
	}
	d, err := readRaw(*raw)
	if err != nil {
		return err
	}
	for _, t := range tables(d) {
		printTable(d, t)
	}
	return nil
}

func tables(d data) []table {
	held := d.param("mem_held_mib")
	maxGrowth := 1.1 * held
	rt := []table{
		{
			title: fmt.Sprintf("Data path: fio, buffered, psync; seq %s with 1 MiB blocks; 4 KiB random on a %s file for %gs",
				mib(d.param("seq_mib")), mib(d.param("rand_mib")), d.param("runtime_s")),
			ref: tmpfs,
			metrics: []metric{
				{key: "seq_write", label: "seq write", unit: "MiB/s", target: target{"ref", 0.9, ">= 0.9x tmpfs"}},
				{key: "seq_read", label: "seq read", unit: "MiB/s", target: target{"ref", 0.9, ">= 0.9x tmpfs"}},
				{key: "randread_1j", label: "4k rand read, 1 job", unit: "IOPS", target: target{"ref", 0.9, ">= 0.9x tmpfs"}},
				{key: "randread_2j", label: "4k rand read, 2 jobs", unit: "IOPS", target: target{"ref", 0.9, ">= 0.9x tmpfs"}},
				{key: "randwrite_1j", label: "4k rand write, 1 job", unit: "IOPS", target: target{"ref", 0.9, ">= 0.9x tmpfs"}},
				{key: "randwrite_2j", label: "4k rand write, 2 jobs", unit: "IOPS", target: target{"ref", 0.9, ">= 0.9x tmpfs"}},
			},
		},
		{
			title: fmt.Sprintf("Metadata: %g files of %g bytes in %g directories, one syscall loop per phase",
				d.param("meta_files"), d.param("meta_size"), d.param("meta_dirs")),
			ref: tmpfs,
			metrics: []metric{
				{key: "create", label: "create+write+close", unit: "ops/s", vsFovl: true, target: target{"fovl", 1.5, ">= 1.5x fuse-overlayfs"}},
				{key: "stat", label: "stat", unit: "ops/s", vsFovl: true, target: target{"fovl", 1.0, ">= 1.0x fuse-overlayfs"}},
				{key: "readdir", label: "readdir (Go's 8 KiB getdents)", unit: "entries/s", vsFovl: true, target: target{"fovl", 1.0, ">= 1.0x fuse-overlayfs"}},
				{key: "readdir32", label: "readdir (glibc's 32 KiB: ls, find)", unit: "entries/s", vsFovl: true, target: target{"fovl", 1.0, ">= 1.0x fuse-overlayfs"}},
				{key: "unlink", label: "unlink", unit: "ops/s", vsFovl: true, target: target{"fovl", 1.5, ">= 1.5x fuse-overlayfs"}},
			},
		},
		{
			title: fmt.Sprintf("Tree: %g files, %s in %g directories; `tar -xf` from tmpfs, then `find -type f -print0 | xargs -0 cat >/dev/null`",
				d.param("tree_files"), mib(d.param("tree_mib")), d.param("tree_dirs")),
			ref: tmpfs,
			metrics: []metric{
				{key: "untar", label: "untar", unit: "s", lower: true, vsFovl: true, target: target{"fovl", 1.5, ">= 1.5x fuse-overlayfs"}},
				{key: "cat", label: "cat all files", unit: "s", lower: true, vsFovl: true, target: target{"fovl", 1.0, ">= 1.0x fuse-overlayfs"}},
			},
		},
		{
			title: fmt.Sprintf("Memory: a %s file written (dd, 1 MiB blocks) and read back once, held, then deleted", mib(held)),
			ref:   tmpfs,
			metrics: []metric{
				{key: "rss_before", label: "daemon RSS, fresh mount", unit: "MiB", noRatio: true},
				{key: "rss_holding", label: "daemon RSS, holding", unit: "MiB", noRatio: true, target: target{"max", 50, "<= 50 MiB"}},
				{key: "rss_after", label: "daemon RSS, after delete", unit: "MiB", noRatio: true},
				{key: "rss_end", label: "daemon RSS, end of round", unit: "MiB", noRatio: true},
				{key: "cached_growth", label: "system Cached growth, holding", unit: "MiB", noRatio: true,
					target: target{"max", maxGrowth, fmt.Sprintf("<= %s (1.1x held)", mib(maxGrowth))}},
				{key: "shmem_growth", label: "system Shmem growth, holding", unit: "MiB", noRatio: true},
				{key: "release", label: "time until 90% of it is freed", unit: "s", noRatio: true, target: target{"max", 5, "<= 5 s"}},
			},
			note: "/proc/meminfo's Cached already includes Shmem (tmpfs pages), so Cached growth is the whole page-cache cost: " +
				"tmpfs pages plus any FUSE page cache kept on top (double caching). The daemon RSS is VmRSS of the FUSE server process. " +
				"Rounds are run one after another, so the end-of-round RSS is after the data, metadata and tree tests.",
		},
	}
	if len(d["lower_seq_read"]) > 0 || len(d["append"]) > 0 || len(d["cat_cold"]) > 0 {
		rt = append(rt, table{
			title: fmt.Sprintf("Overlay over a lower tree on tmpfs (fresh mount and empty upper each round; tmpfs = the lower read directly): "+
				"append 1 byte to a %s lower file, rename a lower directory of %g files, `find | xargs cat` of a %g-file lower tree, fio seq read of a %s lower file",
				mib(d.param("lower_big_mib")), d.param("lower_dir_files"), d.param("tree_files"), mib(d.param("lower_read_mib"))),
			ref: ovl,
			metrics: []metric{
				{key: "append", label: "append 1 byte (copy-up)", unit: "ms", lower: true, target: target{"max", 10, "< 10 ms"}},
				{key: "append_upper", label: "upper bytes after append", unit: "MiB", noRatio: true, target: target{"max", 1, "< 1 MiB"}},
				{key: "append_shmem", label: "system Shmem growth after append", unit: "MiB", noRatio: true},
				{key: "rename_dir", label: "rename lower dir", unit: "ms", lower: true},
				{key: "cat_cold", label: "find + xargs cat, cold", unit: "s", lower: true, vsFovl: true, target: target{"ref", 1 / 1.5, "within 1.5x of overlayfs"}},
				{key: "cat_warm", label: "find + xargs cat, warm", unit: "s", lower: true, vsFovl: true, target: target{"ref", 1 / 1.5, "within 1.5x of overlayfs"}},
				{key: "lower_seq_read", label: "seq read of lower file", unit: "MiB/s", vsFovl: true},
			},
			note: "Ratios here are to kernel overlayfs. Upper bytes: growth of the used blocks of the upper's tmpfs (for csi-memfs its private instance, found under --state-dir; else statfs of the mount). " +
				renameNote(d),
		})
	}
	return rt
}

func renameNote(d data) string {
	var exdev, failed []string
	for _, s := range systems {
		if v, ok := d.median("rename_exdev", s); ok && v > 0 {
			exdev = append(exdev, s)
		}
		if len(d["rename_failed"][s]) > 0 {
			failed = append(failed, s)
		}
	}
	note := "Every rename was one rename(2)."
	if len(exdev) > 0 {
		note = "rename(2) of the lower directory returned EXDEV on " + strings.Join(exdev, ", ") +
			"; the time shown there is `mv`'s copy-and-delete fallback, what a user gets."
	}
	if len(failed) > 0 {
		note += " The rename failed on " + strings.Join(failed, ", ") +
			" (shown as –; `mv`'s error is in rename-errors.log with the raw results)."
	}
	return note
}

func mib(v float64) string {
	if v >= 1024 && math.Mod(v, 1024) == 0 {
		return fmt.Sprintf("%g GiB", v/1024)
	}
	return fmt.Sprintf("%.4g MiB", v)
}

// ratio is the speed of sys relative to ref (> 1: sys is faster).
func ratio(d data, m metric, sys, ref string) (float64, bool) {
	a, ok1 := d.median(m.key, sys)
	b, ok2 := d.median(m.key, ref)
	if !ok1 || !ok2 || a == 0 || b == 0 {
		return 0, false
	}
	if m.lower {
		return b / a, true
	}
	return a / b, true
}

func printTable(d data, t table) {
	var cols []string
	for _, s := range systems {
		if anyValue(d, t, s) {
			cols = append(cols, s)
		}
	}
	if len(cols) == 0 {
		return
	}
	fmt.Printf("\n### %s\n\n", t.title)
	head := "| figure | unit |"
	sep := "| --- | --- |"
	for _, s := range cols {
		head += " " + s + " |"
		sep += " ---: |"
	}
	head += " csi-memfs vs fuse-overlayfs | target (csi-memfs) |"
	sep += " ---: | --- |"
	fmt.Println(head)
	fmt.Println(sep)
	for _, m := range t.metrics {
		if len(d[m.key]) == 0 {
			continue
		}
		row := fmt.Sprintf("| %s | %s |", m.label, m.unit)
		for _, s := range cols {
			v, ok := d.median(m.key, s)
			if !ok {
				row += " – |"
				continue
			}
			cell := num(v, m.unit)
			if !m.noRatio {
				if r, ok := ratio(d, m, s, t.ref); ok {
					cell += fmt.Sprintf(" (%.2fx)", r)
				}
			}
			row += " " + cell + " |"
		}
		if r, ok := ratio(d, m, memfs, fovl); ok && m.vsFovl {
			row += fmt.Sprintf(" %.2fx |", r)
		} else {
			row += " |"
		}
		row += " " + verdict(d, t, m) + " |"
		fmt.Println(row)
	}
	fmt.Printf("\nMedians of %g rounds. Ratios in parentheses: speed relative to %s (> 1 is faster; for times, %s's time / the system's time).",
		d.param("rounds"), t.ref, t.ref)
	if t.note != "" {
		fmt.Printf(" %s", t.note)
	}
	fmt.Println()
}

func anyValue(d data, t table, sys string) bool {
	for _, m := range t.metrics {
		if len(d[m.key][sys]) > 0 {
			return true
		}
	}
	return false
}

// verdict says whether csi-memfs met the row's target, and by how much it
// missed.
func verdict(d data, t table, m metric) string {
	if m.target.kind == "" {
		return ""
	}
	var got float64
	var ok bool
	switch m.target.kind {
	case "ref":
		got, ok = ratio(d, m, memfs, t.ref)
	case "fovl":
		got, ok = ratio(d, m, memfs, fovl)
	case "max":
		got, ok = d.median(m.key, memfs)
	}
	if !ok {
		return m.target.text + ": not measured"
	}
	if m.target.kind == "max" {
		if got <= m.target.x {
			return m.target.text + ": met"
		}
		return fmt.Sprintf("%s: **missed** by %s %s", m.target.text, num(got-m.target.x, m.unit), m.unit)
	}
	if got >= m.target.x {
		return m.target.text + ": met"
	}
	return fmt.Sprintf("%s: **missed**, %.3fx (%.1f%% short)", m.target.text, got, 100*(1-got/m.target.x))
}

func num(v float64, unit string) string {
	switch unit {
	case "s":
		return fmt.Sprintf("%.3f", v)
	case "ms":
		return fmt.Sprintf("%.2f", v)
	case "MiB":
		if math.Abs(v) < 10 {
			return fmt.Sprintf("%.2f", v)
		}
		return fmt.Sprintf("%.0f", v)
	}
	return fmt.Sprintf("%.0f", v)
}
