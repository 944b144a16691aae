// Command pause is the e2e cluster's pod sandbox program (containerd's
// sandbox_image): it holds the pod's namespaces open, reaps the zombies
// re-parented to it, and exits on SIGINT or SIGTERM, like Kubernetes'
// pause. It is a static Go binary, so the image needs nothing else:
//
//	CGO_ENABLED=0 go build -o bin/pause ./hack/pause
package main

import (
	"fmt"
	"os"
	"os/signal"
	"syscall"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "-v" {
		fmt.Println("pause (csi-memfs e2e)")
		return
	}
	sigs := make(chan os.Signal, 4)
	signal.Notify(sigs, syscall.SIGINT, syscall.SIGTERM, syscall.SIGCHLD)
	for s := range sigs {
		if s != syscall.SIGCHLD {
			os.Exit(0)
		}
		for {
			var ws syscall.WaitStatus
			pid, err := syscall.Wait4(-1, &ws, syscall.WNOHANG, nil)
			if pid <= 0 || err != nil {
				break
			}
		}
	}
}
