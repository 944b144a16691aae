#!/usr/bin/env bash
# helm.sh: run Helm v3.19.0, built once from the Go module proxy and cached
# in $E2E_CACHE/helm-v3.19.0 (the same binary `go run
# helm.sh/helm/v3/cmd/helm@v3.19.0` builds; the cache spares the rebuild).
#
#   test/e2e/helm.sh ARGS...     e.g. test/e2e/helm.sh lint charts/csi-memfs
set -euo pipefail
HELM_VERSION=v3.19.0
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
dir=$E2E_CACHE/helm-$HELM_VERSION
if [ ! -x "$dir/helm" ]; then
	mkdir -p "$dir"
	exec 9>"$dir/.lock"
	flock 9
	if [ ! -x "$dir/helm" ]; then
		echo "helm.sh: building helm $HELM_VERSION into $dir (a few minutes, once)" >&2
		(cd / && GOBIN=$dir GOFLAGS= CGO_ENABLED=0 go install -trimpath -ldflags=-s "helm.sh/helm/v3/cmd/helm@$HELM_VERSION") >&2
	fi
	exec 9>&-
fi
exec "$dir/helm" "$@"
