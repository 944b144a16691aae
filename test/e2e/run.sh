#!/usr/bin/env bash
# run.sh: the whole e2e run, as `make e2e` and CI do it:
#
#   1. install the Debian packages the cluster needs (cluster.sh deps);
#   2. build the Kubernetes binaries and Helm, once per machine (cached in
#      $E2E_CACHE, default /var/cache/csi-memfs-e2e), then Kubernetes'
#      agnhost test program and e2e.test (build-agnhost.sh,
#      build-e2e-test.sh, cached too) in the background while the next
#      steps run;
#   3. build the plugin image and the workload image as OCI tarballs
#      (hack/ociimage: no Docker);
#   4. start a single-node cluster in a fresh folder and import the images,
#      then the agnhost image (agnhost on the workload image's busybox) once
#      agnhost is built;
#   5. run the Go suite (go test -tags e2e ./test/e2e/), which installs the
#      chart with Helm, runs pods with csi-memfs volumes and Kubernetes'
#      External Storage suite (TestExternalStorageSuite);
#   6. tear the cluster down (consumer pods, then the plugin, then the
#      processes this run started, then every mount under the folder), even
#      when a step failed. E2E_KEEP=1 keeps it running for a look.
#
# Environment: E2E_DIR (cluster folder; default a new /tmp/csi-memfs-e2e.*),
# E2E_RUN (go test -run pattern), E2E_TIMEOUT (go test -timeout, default 40m).
set -euo pipefail
cd "$(dirname "$0")/../.."
root=$(pwd)
export E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
export PATH=/usr/local/go/bin:$PATH
t0=$(date +%s)
stamp() { echo "e2e: [$(($(date +%s) - t0))s] $*" >&2; }

bash test/e2e/cluster.sh deps
stamp "building Kubernetes and Helm (once per machine, cached in $E2E_CACHE)"
bash test/e2e/helm.sh version --short >/dev/null &
helm_pid=$!
bash test/e2e/build-k8s.sh >/dev/null
wait "$helm_pid"
# After the cluster's binaries, whose packages they share from the build
# cache (built at the same time, both would compile them); agnhost first,
# the smaller.
(bash test/e2e/build-agnhost.sh && bash test/e2e/build-e2e-test.sh) >/dev/null &
e2e_test_pid=$!

stamp "building the plugin and workload images"
out=$root/bin/e2e
mkdir -p "$out"
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w -X main.buildVersion=e2e" -o "$out/csi-memfs" ./cmd/csi-memfs
CGO_ENABLED=0 go build -trimpath -ldflags "-s -w" -o "$out/sealtool" ./test/e2e/sealtool
go run ./hack/ociimage -o "$out/csi-memfs-image.tar" -tag docker.io/csi-memfs/csi-memfs:e2e \
	-file "$out/csi-memfs:/csi-memfs" -busybox "$(command -v busybox)" -entrypoint /csi-memfs -cmd serve
go run ./hack/ociimage -o "$out/workload-image.tar" -tag docker.io/csi-memfs/e2e-workload:e2e \
	-file "$out/sealtool:/bin/sealtool" -busybox "$(command -v busybox)" -applets all -entrypoint /bin/sh

dir=${E2E_DIR:-$(mktemp -d /tmp/csi-memfs-e2e.XXXXXX)}
down() {
	local rc=$?
	if [ "${E2E_KEEP:-}" = 1 ]; then
		stamp "E2E_KEEP=1: cluster left running in $dir (test/e2e/cluster.sh down $dir)"
		return
	fi
	stamp "tearing down $dir"
	bash test/e2e/cluster.sh down "$dir" || rc=1
	if ! grep -q " ${dir%/}/" /proc/self/mountinfo; then
		rm -rf "$dir"
	fi
	stamp "done (exit $rc)"
	exit $rc
}
trap down EXIT
trap 'exit 130' INT TERM

stamp "starting the cluster in $dir"
bash test/e2e/cluster.sh up "$dir"
bash test/e2e/cluster.sh import "$dir" "$out/csi-memfs-image.tar" "$out/workload-image.tar"

stamp "waiting for agnhost and e2e.test"
wait "$e2e_test_pid"
E2E_TEST_BIN=$(bash test/e2e/build-e2e-test.sh)
# The External Storage specs' agnhost containers run agnhost subcommands
# (mounttest) and shell commands (sh -c, cat, ls, ...): agnhost as its own
# image's entrypoint, over every busybox applet. TestExternalStorageSuite
# gives it the name e2e.test runs.
go run ./hack/ociimage -o "$out/agnhost-image.tar" -tag docker.io/csi-memfs/e2e-agnhost:e2e \
	-file "$(bash test/e2e/build-agnhost.sh):/agnhost" -busybox "$(command -v busybox)" -applets all \
	-entrypoint /agnhost -cmd pause
bash test/e2e/cluster.sh import "$dir" "$out/agnhost-image.tar"

stamp "running the suite"
E2E_CLUSTER_DIR=$dir E2E_TEST_BIN=$E2E_TEST_BIN \
	go test -tags e2e -count=1 -v -timeout "${E2E_TIMEOUT:-40m}" ${E2E_RUN:+-run "$E2E_RUN"} ./test/e2e/
stamp "suite passed"
