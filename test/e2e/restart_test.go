//go:build e2e

package e2e

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"
)

// Restarts without downtime (issue 7, docs/restart.md): pods that write
// to their volumes all the time must not notice the plugin being replaced
// by a rolling update, nor the plugin container being killed.

// writerScript is the restart tests' workload. Every 50 ms it appends the
// next number to /data/held through a descriptor it keeps open (FUSE
// passthrough may serve those writes without the plugin), appends it with
// the time (/proc/uptime) to /data/log, opening the file each time, and
// writes it to a new file that it renames over /data/last: the last two
// need the plugin. A failing step prints why to the container's log, which
// otherwise stays empty.
const writerScript = `exec 3>>/data/held
i=0
while :; do
	i=$((i+1))
	read up _ </proc/uptime
	echo $i >&3 || echo "ERR held $i"
	echo "$i $up" >>/data/log || echo "ERR log $i"
	{ echo $i >/data/next && mv /data/next /data/last; } || echo "ERR last $i"
	sleep 0.05
done`

// startWriters starts the workload in two pods with memory volumes and one
// with an image volume, and returns their names once each has written.
func startWriters(t *testing.T, prefix string) []string {
	t.Helper()
	reg := startRegistry(t)
	ref := reg.push(t, "e2e/"+prefix+":v1", map[string]string{"seed.txt": "from the image\n"})
	reg.secret(t, prefix+"-creds")
	pods := []pod{
		{Name: prefix + "-mem-a", Attrs: map[string]string{"size": "16Mi"}, Command: writerScript},
		{Name: prefix + "-mem-b", Attrs: map[string]string{"size": "16Mi"}, Command: writerScript},
		{Name: prefix + "-image", Attrs: map[string]string{"image": ref, "size": "16Mi"}, SecretName: prefix + "-creds", Command: writerScript},
	}
	var names []string
	for _, p := range pods {
		createPod(t, p)
		names = append(names, p.Name)
	}
	// After a failure the pods may not go (their volumes cannot be
	// unpublished): leave them to the namespace's deletion at the end.
	t.Cleanup(func() {
		kubectl(append([]string{"-n", testNS, "delete", "pod", "--ignore-not-found", "--wait=false"}, names...)...)
	})
	for _, name := range names {
		waitRunning(t, name)
	}
	for _, name := range names {
		if err := poll(time.Minute, func() (bool, error) {
			n, _ := lastCount(t, name)
			return n >= 10, nil
		}); err != nil {
			out, _ := kubectl("-n", testNS, "logs", name)
			t.Fatalf("pod %s has not written: %v\n%s", name, err, out)
		}
	}
	return names
}

// kubectlOut runs kubectl and returns its standard output alone:
// kubectl's own messages on stderr ("Unknown stream id 1, discarding
// message") must not mix with a file's content or a pod's log.
func kubectlOut(args ...string) (string, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, filepath.Join(cl.bin, "kubectl"), append([]string{"--kubeconfig", cl.kubeconfig}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return string(out), fmt.Errorf("%v: %s", err, stderr.String())
	}
	return string(out), nil
}

// podRead runs script in the pod's container and returns its standard
// output.
func podRead(name, script string) (string, error) {
	return kubectlOut("-n", testNS, "exec", name, "-c", "app", "--", "sh", "-c", script)
}

// lastCount returns the last number in the pod's /data/log.
func lastCount(t *testing.T, name string) (int, error) {
	t.Helper()
	out, err := podRead(name, "tail -n 2 /data/log")
	if err != nil {
		return 0, fmt.Errorf("%v: %s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(out), "\n")
	if len(lines) < 1 {
		return 0, fmt.Errorf("empty log")
	}
	// The last line may be being written: take the one before if need be.
	for i := len(lines) - 1; i >= 0; i-- {
		if f := strings.Fields(lines[i]); len(f) == 2 {
			if n, err := strconv.Atoi(f[0]); err == nil {
				return n, nil
			}
		}
	}
	return 0, fmt.Errorf("no count in %q", out)
}

// checkCounts reads a file of lines starting with 1, 2, 3, ... and reports
// the first gap or disorder; it returns the count and the longest time
// between two lines (0 without times). A last line without its newline is
// still being written and is left out.
func checkCounts(file, content string) (n int, maxPause time.Duration, err error) {
	if i := strings.LastIndexByte(content, '\n'); i >= 0 {
		content = content[:i]
	}
	var prev float64
	for i, line := range strings.Split(content, "\n") {
		f := strings.Fields(line)
		if len(f) == 0 {
			return n, maxPause, fmt.Errorf("%s: line %d is empty", file, i+1)
		}
		v, convErr := strconv.Atoi(f[0])
		if convErr != nil || v != i+1 {
			return n, maxPause, fmt.Errorf("%s: line %d is %q, want %d (a lost or repeated write)", file, i+1, line, i+1)
		}
		n = v
		if len(f) == 2 {
			if up, err := strconv.ParseFloat(f[1], 64); err == nil {
				if prev > 0 && time.Duration((up-prev)*float64(time.Second)) > maxPause {
					maxPause = time.Duration((up - prev) * float64(time.Second))
				}
				prev = up
			}
		}
	}
	return n, maxPause, nil
}

// checkWriters checks that each writer pod runs on without a restart, its
// volume answers, every write it made is in its files in order, it wrote
// on after the event (before, its count when the event began), and it
// logged no error.
func checkWriters(t *testing.T, names []string, before map[string]int) {
	t.Helper()
	for _, name := range names {
		out, err := kubectl("-n", testNS, "get", "pod", name, "-o",
			"jsonpath={.status.phase} {.status.containerStatuses[0].restartCount} {.status.containerStatuses[0].ready}")
		if err != nil || out != "Running 0 true" {
			t.Errorf("pod %s: phase, restarts, ready = %q (%v); want Running 0 true", name, out, err)
		}
		// Still writing: the count grows.
		n1, err := lastCount(t, name)
		if err != nil {
			t.Errorf("pod %s: reading /data/log: %v", name, err)
			continue
		}
		if err := poll(30*time.Second, func() (bool, error) {
			n2, err := lastCount(t, name)
			return err == nil && n2 > n1 && n2 > before[name], nil
		}); err != nil {
			t.Errorf("pod %s stopped writing at %d (%d before the event)", name, n1, before[name])
		}
		// Named, not listed: ls of /data stats each name it read, and
		// /data/next comes and goes with every write (a listing that
		// caught it failed with ENOENT once it was renamed).
		out, err = podExec(t, name, "ls /data/held /data/log /data/last && cat /data/last")
		if err != nil {
			t.Errorf("pod %s: ls and cat in the volume: %v\n%s", name, err, out)
		}
		if strings.HasSuffix(name, "-image") {
			if out, err := podRead(name, "cat /data/seed.txt"); err != nil || out != "from the image\n" {
				t.Errorf("pod %s: the image's file reads %q (%v)", name, out, err)
			}
		}
		for _, file := range []string{"/data/log", "/data/held"} {
			content, err := podRead(name, "cat "+file)
			if err != nil {
				t.Errorf("pod %s: cat %s: %v\n%s", name, file, err, content)
				continue
			}
			n, pause, err := checkCounts(file, content)
			if err != nil {
				t.Errorf("pod %s: %v", name, err)
			}
			if pause > 0 {
				t.Logf("pod %s: %d writes to %s, the longest pause between two %s", name, n, file, pause.Round(time.Millisecond))
			}
		}
		if logs, err := kubectlOut("-n", testNS, "logs", name); err != nil || strings.TrimSpace(logs) != "" {
			t.Errorf("pod %s logged errors (Transport endpoint is not connected, Input/output error, ...):\n%s%v",
				name, logs, err)
		}
	}
}

// counts returns each writer's current count.
func counts(t *testing.T, names []string) map[string]int {
	t.Helper()
	m := map[string]int{}
	for _, name := range names {
		n, err := lastCount(t, name)
		if err != nil {
			t.Fatalf("pod %s: %v", name, err)
		}
		m[name] = n
	}
	return m
}

// deleteWriters deletes the writer pods and checks that the plugin
// unpublished their volumes: nothing is left mounted in the pods'
// directories.
func deleteWriters(t *testing.T, names []string) {
	t.Helper()
	var dirs []string
	for _, name := range names {
		dirs = append(dirs, filepath.Join(cl.kubeletDir, "pods", podUID(t, name)))
	}
	if out, err := kubectl(append([]string{"-n", testNS, "delete", "pod", "--timeout=90s"}, names...)...); err != nil {
		t.Errorf("deleting the writer pods (kubelet unpublishes their volumes): %v\n%s", err, out)
	}
	if left := mountsUnder(dirs...); len(left) > 0 {
		t.Errorf("mounts left after the writer pods were deleted: %v", left)
	}
}

// pluginPods returns the names of the plugin's pods.
func pluginPods(t *testing.T) []string {
	t.Helper()
	out, err := kubectl("-n", pluginNS, "get", "pods", "-l", "app.kubernetes.io/name=csi-memfs",
		"-o", "jsonpath={.items[*].metadata.name}")
	if err != nil {
		t.Fatalf("listing plugin pods: %v\n%s", err, out)
	}
	return strings.Fields(out)
}

// onePluginPod returns the plugin pod, waiting until only one is left.
func onePluginPod(t *testing.T) string {
	t.Helper()
	var pods []string
	if err := poll(2*time.Minute, func() (bool, error) {
		pods = pluginPods(t)
		return len(pods) == 1, nil
	}); err != nil {
		dumpPlugin()
		t.Fatalf("plugin pods %v: want one: %v", pods, err)
	}
	return pods[0]
}

// pluginStatus returns the plugin pod's container of name: its ID (without
// the runtime prefix; empty while there is none), restart count and
// readiness.
func pluginStatus(t *testing.T, podName, container string) (id string, restarts int, ready bool) {
	t.Helper()
	sel := `{.status.containerStatuses[?(@.name=="` + container + `")]`
	out, err := kubectl("-n", pluginNS, "get", "pod", podName, "-o",
		"jsonpath="+sel+".containerID}|"+sel+".restartCount}|"+sel+".ready}")
	f := strings.Split(out, "|")
	if err != nil || len(f) != 3 {
		t.Logf("status of %s in %s: %q %v", container, podName, out, err)
		return "", -1, false
	}
	restarts, _ = strconv.Atoi(f[1])
	_, id, _ = strings.Cut(f[0], "://")
	return id, restarts, f[2] == "true"
}

// servePID finds the `csi-memfs serve` process of the container id: this
// single-node cluster runs on this machine, so the container's processes
// are local, in a cgroup named after it.
func servePID(t *testing.T, containerID string) int {
	t.Helper()
	procs, _ := filepath.Glob("/proc/[0-9]*")
	for _, p := range procs {
		cmd, err := os.ReadFile(filepath.Join(p, "cmdline"))
		if err != nil || !strings.HasPrefix(string(cmd), "/csi-memfs\x00serve\x00") {
			continue
		}
		cg, err := os.ReadFile(filepath.Join(p, "cgroup"))
		if err != nil || !strings.Contains(string(cg), containerID) {
			continue
		}
		pid, _ := strconv.Atoi(filepath.Base(p))
		return pid
	}
	t.Fatalf("no csi-memfs serve process in container %s", containerID)
	return 0
}

// beginRestart starts a restart test: writer pods named after prefix (see
// startWriters), once running; it returns them, the plugin pod, and the
// writers' counts.
func beginRestart(t *testing.T, prefix string) (names []string, plugin string, before map[string]int) {
	t.Helper()
	requireCluster(t)
	names = startWriters(t, prefix)
	plugin = onePluginPod(t)
	time.Sleep(time.Second)
	return names, plugin, counts(t, names)
}

// finishRestart ends a restart test: kubelet has the plugin registered
// again (pods created from now on need it), the writers started before
// lost nothing and saw no error, and they are deleted.
func finishRestart(t *testing.T, names []string, before map[string]int) {
	t.Helper()
	if err := waitRegistered(); err != nil {
		t.Error(err)
	}
	time.Sleep(2 * time.Second)
	checkWriters(t, names, before)
	deleteWriters(t, names)
}

// TestRolloutRestart: a rolling update of the plugin (maxSurge: the new
// pod takes the volumes over from the old one) goes unnoticed by pods that
// write all the time.
func TestRolloutRestart(t *testing.T) {
	names, oldPod, before := beginRestart(t, "rollout")

	start := time.Now()
	if out, err := kubectl("-n", pluginNS, "rollout", "restart", "daemonset/csi-memfs"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if out, err := kubectl("-n", pluginNS, "rollout", "status", "daemonset/csi-memfs", "--timeout=3m"); err != nil {
		dumpPlugin()
		// Back to one plugin pod for the tests after this one.
		kubectl("-n", pluginNS, "rollout", "undo", "daemonset/csi-memfs")
		kubectl("-n", pluginNS, "rollout", "status", "daemonset/csi-memfs", "--timeout=2m")
		t.Fatalf("rollout: %v\n%s", err, out)
	}
	// The old pod, holder included, is gone: from now on only the new
	// pod's processes hold the volumes' connections.
	newPod := onePluginPod(t)
	t.Logf("rollout from %s to %s took %s", oldPod, newPod, time.Since(start).Round(time.Second))
	if newPod == oldPod {
		t.Fatalf("plugin pod %s was not replaced", oldPod)
	}
	for _, c := range []string{"holder", "csi-memfs"} {
		if _, restarts, ready := pluginStatus(t, newPod, c); restarts != 0 || !ready {
			t.Errorf("new plugin pod's %s: %d restarts, ready %v; want 0, true", c, restarts, ready)
		}
	}
	finishRestart(t, names, before)
}

// TestPluginPodDeleted: the plugin pod deleted (`kubectl delete pod`, as an
// operator restarts it) loses nothing. With maxSurge the DaemonSet starts a
// replacement while the deleted pod terminates; the deleted pod's plugin
// waits for it (--handover-wait) and hands the volumes over, before its
// holder goes with its pod. The writing pods notice at most a pause.
func TestPluginPodDeleted(t *testing.T) {
	names, oldPod, before := beginRestart(t, "delete")

	start := time.Now()
	if out, err := kubectl("-n", pluginNS, "delete", "pod", oldPod, "--wait=false"); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var newPod string
	if err := poll(3*time.Minute, func() (bool, error) {
		pods := pluginPods(t)
		if len(pods) != 1 || pods[0] == oldPod {
			return false, nil
		}
		newPod = pods[0]
		_, _, ready := pluginStatus(t, newPod, "csi-memfs")
		return ready, nil
	}); err != nil {
		dumpPlugin()
		t.Fatalf("no replacement plugin pod alone and ready: %v", err)
	}
	t.Logf("plugin pod %s deleted, %s alone and ready %s later", oldPod, newPod, time.Since(start).Round(time.Second))
	finishRestart(t, names, before)
}

// TestPluginKill: the plugin container killed with SIGKILL (as an OOM kill
// does) is restarted by kubelet, gets the volumes' connections back from
// the holder, and the writing pods notice at most a pause.
func TestPluginKill(t *testing.T) {
	names, plugin, before := beginRestart(t, "kill")
	id, restarts, _ := pluginStatus(t, plugin, "csi-memfs")
	holderID, holderRestarts, _ := pluginStatus(t, plugin, "holder")
	pid := servePID(t, id)

	start := time.Now()
	if err := syscall.Kill(pid, syscall.SIGKILL); err != nil {
		t.Fatalf("kill -9 %d: %v", pid, err)
	}
	if err := poll(2*time.Minute, func() (bool, error) {
		_, n, ready := pluginStatus(t, plugin, "csi-memfs")
		return n > restarts && ready, nil
	}); err != nil {
		dumpPlugin()
		t.Fatalf("the killed plugin container did not come back ready: %v", err)
	}
	t.Logf("plugin container back and ready %s after kill -9", time.Since(start).Round(100*time.Millisecond))
	newID, _, _ := pluginStatus(t, plugin, "csi-memfs")
	if newPID := servePID(t, newID); newPID == pid {
		t.Errorf("serve process %d still runs", pid)
	}
	if id2, n, ready := pluginStatus(t, plugin, "holder"); id2 != holderID || n != holderRestarts || !ready {
		t.Errorf("the holder changed: container %s (was %s), %d restarts (was %d), ready %v", id2, holderID, n, holderRestarts, ready)
	}
	finishRestart(t, names, before)
}
