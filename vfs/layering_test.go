package vfs_test

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports keeps vfs at the bottom of the house: the contract imports
// the standard library and golang.org/x/sys/unix, nothing else.
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", "-f", "{{if not .Standard}}{{.ImportPath}}{{end}}", "github.com/csi-memfs/csi-memfs/vfs").CombinedOutput()
	if err != nil {
		t.Fatalf("go list: %v\n%s", err, out)
	}
	for _, dep := range strings.Fields(string(out)) {
		switch dep {
		case "github.com/csi-memfs/csi-memfs/vfs", "golang.org/x/sys/unix":
		default:
			t.Errorf("vfs imports %s (directly or not): it may import only the standard library and golang.org/x/sys/unix", dep)
		}
	}
}
