package main

import (
	"crypto/sha256"
	"io"
	"io/fs"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

func TestMedian(t *testing.T) {
	for _, tc := range []struct {
		in   []float64
		want float64
		ok   bool
	}{
		{nil, 0, false},
		{[]float64{3}, 3, true},
		{[]float64{5, 1, 3}, 3, true},
		{[]float64{4, 1, 3, 2}, 2.5, true},
	} {
		d := data{"m": {"s": tc.in}}
		got, ok := d.median("m", "s")
		if got != tc.want || ok != tc.ok {
			t.Errorf("median(%v) = %v, %v; want %v, %v", tc.in, got, ok, tc.want, tc.ok)
		}
	}
}

func TestVerdict(t *testing.T) {
	d := data{
		"seq_write":   {tmpfs: {1000}, memfs: {850}},
		"untar":       {fovl: {3}, memfs: {1}},
		"rss_holding": {memfs: {60}},
	}
	tb := table{ref: tmpfs}
	for _, tc := range []struct {
		m    metric
		want string
	}{
		{metric{key: "seq_write", target: target{"ref", 0.9, ">= 0.9x tmpfs"}}, ">= 0.9x tmpfs: **missed**, 0.850x (5.6% short)"},
		{metric{key: "untar", lower: true, target: target{"fovl", 1.5, ">= 1.5x"}}, ">= 1.5x: met"},
		{metric{key: "rss_holding", unit: "MiB", target: target{"max", 50, "<= 50 MiB"}}, "<= 50 MiB: **missed** by 10 MiB"},
		{metric{key: "absent", target: target{"max", 1, "< 1"}}, "< 1: not measured"},
	} {
		if got := verdict(d, tb, tc.m); got != tc.want {
			t.Errorf("verdict(%s) = %q, want %q", tc.m.key, got, tc.want)
		}
	}
}

// The tree must be the same on every run: same names, sizes and bytes.
func TestGentreeDeterministic(t *testing.T) {
	sum := func(dir string) string {
		h := sha256.New()
		err := filepath.WalkDir(dir, func(p string, e fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			rel, _ := filepath.Rel(dir, p)
			h.Write([]byte(rel + "\n"))
			if !e.IsDir() {
				b, err := os.ReadFile(p)
				if err != nil {
					return err
				}
				h.Write(b)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		return string(h.Sum(nil))
	}
	a, b := filepath.Join(t.TempDir(), "a"), filepath.Join(t.TempDir(), "b")
	for _, d := range []string{a, b} {
		if err := cmdGentree([]string{"-dir", d, "-n", "200"}); err != nil {
			t.Fatal(err)
		}
	}
	if got, want := sum(a), sum(b); got != want {
		t.Error("two trees from one seed differ")
	}
}

func TestReadRawSkipsNA(t *testing.T) {
	p := filepath.Join(t.TempDir(), "raw.tsv")
	raw := strings.Join([]string{"1\tcreate\tcsi-memfs\t100", "2\tcreate\tcsi-memfs\tNA", "0\tparam_rounds\t-\t2", "bad line"}, "\n")
	if err := os.WriteFile(p, []byte(raw), 0o644); err != nil {
		t.Fatal(err)
	}
	d, err := readRaw(p)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := len(d["create"][memfs]), 1; got != want {
		t.Errorf("create values: got %d, want %d", got, want)
	}
	if got, want := d.param("rounds"), 2.0; got != want {
		t.Errorf("param rounds: got %v, want %v", got, want)
	}
}

// TestFiles runs the files walk on a small tree: one line per step and per
// kind of context switch, each a number; an empty tree is an error.
func TestFiles(t *testing.T) {
	dir := t.TempDir()
	for _, n := range []string{"a", "b", "d/c"} {
		os.MkdirAll(filepath.Dir(filepath.Join(dir, n)), 0o755)
		if err := os.WriteFile(filepath.Join(dir, n), []byte(n), 0o644); err != nil {
			t.Fatal(err)
		}
	}
	if got := figureKeys(t, cmdFiles, "-dir", dir); got != "open fstat read close voluntary involuntary" {
		t.Errorf("keys %q", got)
	}
	if err := cmdFiles([]string{"-dir", t.TempDir()}); err == nil {
		t.Errorf("an empty tree: no error")
	}
}

// TestMeta runs the metadata phases on a small set: one figure per phase,
// both listings included (each checks that it saw every file).
func TestMeta(t *testing.T) {
	if got := figureKeys(t, cmdMeta, "-dir", t.TempDir(), "-n", "600", "-dirs", "3"); got != "create stat readdir readdir32 unlink" {
		t.Errorf("keys %q", got)
	}
}

// figureKeys runs cmd with args, checks that each line it prints is
// NAME<TAB>NUMBER and returns the names, space-separated.
func figureKeys(t *testing.T, cmd func([]string) error, args ...string) string {
	t.Helper()
	r, w, err := os.Pipe()
	if err != nil {
		t.Fatal(err)
	}
	stdout := os.Stdout
	os.Stdout = w
	err = cmd(args)
	os.Stdout = stdout
	w.Close()
	out, _ := io.ReadAll(r)
	if err != nil {
		t.Fatal(err)
	}
	var keys []string
	for _, line := range strings.Split(strings.TrimSpace(string(out)), "\n") {
		k, v, ok := strings.Cut(line, "\t")
		if _, perr := strconv.ParseFloat(v, 64); !ok || perr != nil {
			t.Errorf("line %q: want NAME<TAB>NUMBER", line)
		}
		keys = append(keys, k)
	}
	return strings.Join(keys, " ")
}
