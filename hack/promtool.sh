#!/usr/bin/env bash
# promtool.sh: run promtool from Debian 12's prometheus package (2.42),
# fetched once with apt-get download (apt checks it against the signed
# archive) and only promtool extracted: nothing is installed, no
# Prometheus server set up. Cached in $E2E_CACHE/promtool-DEBVERSION.
#
#   bash hack/promtool.sh test rules test/prometheus/alerts_test.yaml
set -euo pipefail
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
bin=$(ls -d "$E2E_CACHE"/promtool-*/promtool 2>/dev/null | tail -1 || true)
if [ -z "$bin" ]; then
	mkdir -p "$E2E_CACHE"
	exec 9>"$E2E_CACHE/.promtool.lock"
	flock 9
	bin=$(ls -d "$E2E_CACHE"/promtool-*/promtool 2>/dev/null | tail -1 || true)
	if [ -z "$bin" ]; then
		tmp=$(mktemp -d)
		trap 'rm -rf "$tmp"' EXIT
		chmod 755 "$tmp" # apt downloads as _apt
		echo "promtool.sh: fetching Debian's prometheus package for promtool (once)" >&2
		if ! (cd "$tmp" && apt-get download -qq prometheus 2>/dev/null); then
			apt-get update -qq
			(cd "$tmp" && apt-get download -qq prometheus)
		fi
		deb=$(ls "$tmp"/prometheus_*.deb)
		ver=$(dpkg-deb -f "$deb" Version)
		dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$tmp" ./usr/bin/promtool
		mkdir -p "$E2E_CACHE/promtool-$ver"
		install -m 0755 "$tmp/usr/bin/promtool" "$E2E_CACHE/promtool-$ver/promtool"
		bin=$E2E_CACHE/promtool-$ver/promtool
	fi
	exec 9>&-
fi
exec "$bin" "$@"
