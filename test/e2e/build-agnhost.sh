#!/usr/bin/env bash
# build-agnhost.sh: build (once) Kubernetes' agnhost test binary
# (k8s.io/kubernetes/test/images/agnhost, the program of the
# registry.k8s.io/e2e-test-images/agnhost image) at the cluster's version
# and print its path. The External Storage suite's dynamic volume specs run
# agnhost pods, which the e2e cluster cannot pull: TestExternalStorageSuite
# (storage_suite_test.go) gives an image of this binary the name e2e.test
# expects (run.sh packs it with hack/ociimage).
#
# Built like e2e.test (build-e2e-test.sh): static (CGO_ENABLED=0), in the
# scratch module of k8s-module.sh, sharing its module download and build
# cache; cached in $E2E_CACHE/k8s-$K8S_VERSION/agnhost/agnhost (default
# /var/cache/csi-memfs-e2e) with its own lock.
#
# Usage: test/e2e/build-agnhost.sh       build if needed, print the path
set -euo pipefail

K8S_VERSION=${K8S_VERSION:-v1.33.13}
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
GO=${GO:-go}
# shellcheck source=k8s-module.sh
. "$(dirname "$0")/k8s-module.sh"

out=$E2E_CACHE/k8s-$K8S_VERSION/agnhost
have() { [ -x "$out/agnhost" ] && [ -f "$out/.complete" ]; }

if have; then
	echo "$out/agnhost"
	exit 0
fi
mkdir -p "$out"
# One builder at a time (CI and a developer may start together).
exec 9>"$out/.lock"
flock 9
if have; then
	echo "$out/agnhost"
	exit 0
fi

src=$out/src
rm -rf "$src"
k8s_module "$src"
cd "$src"

echo "build-agnhost: building Kubernetes $K8S_VERSION agnhost into $out" >&2
start=$(date +%s)
rm -f "$out/agnhost.tmp"
GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local \
	nice -n 10 "$GO" build -trimpath -ldflags "$(k8s_ldflags)" -o "$out/agnhost.tmp" k8s.io/kubernetes/test/images/agnhost >&2
mv "$out/agnhost.tmp" "$out/agnhost"
touch "$out/.complete"
echo "build-agnhost: built in $(($(date +%s) - start))s" >&2
cd /
rm -rf "$src"
echo "$out/agnhost"
