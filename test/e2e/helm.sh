#!/usr/bin/env bash
# helm.sh: run Helm v3.19.0, built once from the Go module proxy and cached
# in $E2E_CACHE/helm-v3.19.0-k8s1.34 (the binary `go install
# helm.sh/helm/v3/cmd/helm@v3.19.0` builds, with the Kubernetes version
# Helm's own Makefile stamps into release binaries: 1.34, from its
# k8s.io/client-go v0.34. Without it `helm template` and `helm lint` check
# the chart's kubeVersion against Kubernetes 1.20).
#
#   test/e2e/helm.sh ARGS...     e.g. test/e2e/helm.sh lint charts/csi-memfs
set -euo pipefail
HELM_VERSION=v3.19.0
HELM_K8S_MINOR=34
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
dir=$E2E_CACHE/helm-$HELM_VERSION-k8s1.$HELM_K8S_MINOR
if [ ! -x "$dir/helm" ]; then
	mkdir -p "$dir"
	exec 9>"$dir/.lock"
	flock 9
	if [ ! -x "$dir/helm" ]; then
		echo "helm.sh: building helm $HELM_VERSION into $dir (a few minutes, once)" >&2
		ldflags="-s"
		for p in helm.sh/helm/v3/pkg/lint/rules helm.sh/helm/v3/pkg/chartutil; do
			ldflags="$ldflags -X $p.k8sVersionMajor=1 -X $p.k8sVersionMinor=$HELM_K8S_MINOR"
		done
		(cd / && GOBIN=$dir GOFLAGS= CGO_ENABLED=0 go install -trimpath -ldflags="$ldflags" "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2
	fi
	exec 9>&-
fi
exec "$dir/helm" "$@"
