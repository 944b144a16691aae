// Package treetest builds directory trees for tests of the packages that
// serve them.
package treetest

import (
	"os"
	"path/filepath"
	"strconv"
	"testing"
)

// BigLower makes a tree whose directory "big" holds n empty files, f0...,
// and dirs directories, d0..., and returns the tree's root.
func BigLower(t testing.TB, n, dirs int) string {
	t.Helper()
	root := t.TempDir()
	big := filepath.Join(root, "big")
	if err := os.Mkdir(big, 0o755); err != nil {
		t.Fatal(err)
	}
	for i := range n {
		f, err := os.Create(filepath.Join(big, "f"+strconv.Itoa(i)))
		if err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	for i := range dirs {
		if err := os.Mkdir(filepath.Join(big, "d"+strconv.Itoa(i)), 0o755); err != nil {
			t.Fatal(err)
		}
	}
	return root
}
