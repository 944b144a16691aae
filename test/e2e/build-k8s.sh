#!/usr/bin/env bash
# build-k8s.sh: build (once) the Kubernetes binaries the e2e cluster runs and
# print the directory that holds them.
#
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl
# are compiled from source through the Go module proxy, in the scratch module
# k8s-module.sh writes (shared with build-e2e-test.sh); the few staging
# modules the proxy does not serve (code-generator, sample-*) become empty
# local stubs, since no binary built here imports them.
#
# The binaries are cached in $E2E_CACHE/k8s-$K8S_VERSION/bin (default
# /var/cache/csi-memfs-e2e), so later runs on the same machine reuse them; a
# fresh machine builds them (measured: 10 minutes on an idle 2-core machine,
# 25 under heavy load; ~2 GB of memory, ~4 GB of module and build cache).
#
# Usage: test/e2e/build-k8s.sh            build if needed, print the bin dir
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.33.13}
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
GO=${GO:-go}
# shellcheck source=k8s-module.sh
. "$(dirname "$0")/k8s-module.sh"

out=$E2E_CACHE/k8s-$K8S_VERSION
bins=(kube-apiserver kube-controller-manager kube-scheduler kubelet kubectl)

have_all() {
	local b
	for b in "${bins[@]}"; do [ -x "$out/bin/$b" ] || return 1; done
	[ -f "$out/bin/.complete" ]
}

if have_all; then
	echo "$out/bin"
	exit 0
fi

mkdir -p "$out"
# One builder at a time (CI and a developer may start together).
exec 9>"$out/.lock"
flock 9
if have_all; then
	echo "$out/bin"
	exit 0
fi

src=$out/src
rm -rf "$src"
k8s_module "$src"
cd "$src"

pkgs=()
for b in "${bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done
ldflags=$(k8s_ldflags)

echo "build-k8s: building Kubernetes $K8S_VERSION into $out/bin (cold: 10-25 minutes)" >&2
start=$(date +%s)
mkdir -p "$out/bin.tmp"
GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local \
	nice -n 10 "$GO" build -trimpath -ldflags "$ldflags" -o "$out/bin.tmp/" "${pkgs[@]}" >&2
rm -rf "$out/bin"
mv "$out/bin.tmp" "$out/bin"
touch "$out/bin/.complete"
echo "build-k8s: built in $(($(date +%s) - start))s" >&2
cd /
rm -rf "$src"
echo "$out/bin"
