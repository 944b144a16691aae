#!/usr/bin/env bash
# build-e2e-test.sh: build (once) Kubernetes' e2e.test binary (the
# conformance and storage suites, k8s.io/kubernetes/test/e2e) at the
# cluster's version and print its path. TestExternalStorageSuite
# (storage_suite_test.go) runs its External Storage specs against csi-memfs.
#
# Built like the cluster's binaries (build-k8s.sh, k8s-module.sh): a scratch
# module requiring k8s.io/kubernetes through the Go module proxy, sharing
# the module download and build cache with build-k8s.sh. e2e.test imports
# k8s.io/sample-apiserver (the aggregator test), which the proxy serves at
# v0.33.5 but not v0.33.13: $K8S_SAMPLE_APISERVER replaces it.
#
# Cached in $E2E_CACHE/k8s-$K8S_VERSION/e2e/e2e.test (default
# /var/cache/csi-memfs-e2e) with its own lock, so it builds in parallel with
# build-k8s.sh.
#
# Usage: test/e2e/build-e2e-test.sh       build if needed, print the path
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.33.13}
K8S_SAMPLE_APISERVER=${K8S_SAMPLE_APISERVER:-v0.33.5}
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
GO=${GO:-go}
# shellcheck source=k8s-module.sh
. "$(dirname "$0")/k8s-module.sh"

out=$E2E_CACHE/k8s-$K8S_VERSION/e2e
have() { [ -x "$out/e2e.test" ] && [ -f "$out/.complete" ]; }

if have; then
	echo "$out/e2e.test"
	exit 0
fi
mkdir -p "$out"
# One builder at a time (CI and a developer may start together).
exec 9>"$out/.lock"
flock 9
if have; then
	echo "$out/e2e.test"
	exit 0
fi

src=$out/src
rm -rf "$src"
k8s_module "$src" "k8s.io/sample-apiserver@$K8S_SAMPLE_APISERVER"
cd "$src"

echo "build-e2e-test: building Kubernetes $K8S_VERSION e2e.test into $out" >&2
start=$(date +%s)
rm -f "$out/e2e.test.tmp"
GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local \
	nice -n 10 "$GO" test -c -vet=off -trimpath -ldflags "$(k8s_ldflags)" -o "$out/e2e.test.tmp" k8s.io/kubernetes/test/e2e >&2
mv "$out/e2e.test.tmp" "$out/e2e.test"
touch "$out/.complete"
echo "build-e2e-test: built in $(($(date +%s) - start))s" >&2
cd /
rm -rf "$src"
echo "$out/e2e.test"
