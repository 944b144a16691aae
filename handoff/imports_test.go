package handoff

import (
	"os/exec"
	"strings"
	"testing"
)

// TestImports keeps handoff small and at the bottom: the standard library,
// x/sys/unix and klog, nothing of FUSE, CSI or the other packages.
func TestImports(t *testing.T) {
	out, err := exec.Command("go", "list", "-f", `{{join .Imports "\n"}}`, ".").Output()
	if err != nil {
		t.Fatalf("go list: %v", err)
	}
	for _, imp := range strings.Fields(string(out)) {
		if strings.Contains(strings.SplitN(imp, "/", 2)[0], ".") && imp != "golang.org/x/sys/unix" && imp != "k8s.io/klog/v2" {
			t.Errorf("handoff imports %s", imp)
		}
	}
}
