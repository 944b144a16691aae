#!/usr/bin/env bash
# build-k8s.sh: build (once) the Kubernetes binaries the e2e cluster runs and
# print the directory that holds them.
#
# kube-apiserver, kube-controller-manager, kube-scheduler, kubelet and kubectl
# are compiled from source through the Go module proxy. `go install
# k8s.io/kubernetes/cmd/...@v` does not work (the kubernetes module replaces
# its staging modules with local paths), so a scratch module requires
# k8s.io/kubernetes and replaces every staging module with its published
# v0.MINOR.PATCH; the few staging modules the proxy does not serve
# (code-generator, sample-*) become empty local stubs, since no binary built
# here imports them.
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

staging_version=v0.${K8S_VERSION#v1.}
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
mkdir -p "$src/stubs"
cd "$src"

{
	echo "module csi-memfs-e2e/k8s"
	echo
	echo "go 1.24.0"
	echo
	echo "godebug default=go1.24"
	echo
	echo "require k8s.io/kubernetes $K8S_VERSION"
	echo
	echo "replace ("
} >go.mod

# The staging modules come from the kubernetes module's own replace block.
(cd / && GOFLAGS= "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION") >download.json
kmod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' download.json)
staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$kmod")
[ -n "$staging" ] || { echo "build-k8s: no staging modules found in $kmod" >&2; exit 1; }
for m in $staging; do
	case $m in
	k8s.io/code-generator | k8s.io/sample-*)
		d=stubs/${m#k8s.io/}
		mkdir -p "$d"
		printf 'module %s\n\ngo 1.24\n' "$m" >"$d/go.mod"
		echo "	$m => ./$d" >>go.mod
		;;
	*)
		echo "	$m => $m $staging_version" >>go.mod
		;;
	esac
done
echo ")" >>go.mod

pkgs=()
for b in "${bins[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$b"); done

minor=${K8S_VERSION#v1.}
minor=${minor%%.*}
ldflags="-s -w"
for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
	ldflags+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
	ldflags+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
done

echo "build-k8s: building Kubernetes $K8S_VERSION into $out/bin (cold: 10-25 minutes)" >&2
start=$(date +%s)
mkdir -p "$out/bin.tmp"
GOFLAGS=-mod=mod CGO_ENABLED=0 GOTOOLCHAIN=local \
	nice -n 10 "$GO" build -trimpath -ldflags "$ldflags" -o "$out/bin.tmp/" "${pkgs[@]}" >&2
rm -rf "$out/bin"
mv "$out/bin.tmp" "$out/bin"
touch "$out/bin/.complete"
echo "build-k8s: built in $(($(date +%s) - start))s" >&2
rm -rf "$src"
echo "$out/bin"
