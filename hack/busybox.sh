#!/usr/bin/env bash
# busybox.sh: a static busybox for one architecture, Debian 12's
# busybox-static package (fetched with apt-get download, so apt checks it
# against the signed archive), extracted to OUT. The plugin image needs it
# for the mount and umount that mount-utils runs.
#
#   bash hack/busybox.sh ARCH OUT      e.g. bash hack/busybox.sh arm64 bin/release/linux-arm64/busybox
#
# A foreign ARCH is added to dpkg's architectures (dpkg --add-architecture)
# and the package lists updated once. The .deb is kept beside OUT.
set -euo pipefail
arch=${1:?usage: busybox.sh ARCH OUT}
out=${2:?usage: busybox.sh ARCH OUT}
case $arch in
amd64) machine="3e 00" ;;
arm64) machine="b7 00" ;;
*) echo "busybox.sh: unsupported architecture $arch (amd64, arm64)" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$out")"
dir=$(cd "$(dirname "$out")" && pwd)

if ! ls "$dir"/busybox-static_*_"$arch".deb >/dev/null 2>&1; then
	if [ "$arch" != "$(dpkg --print-architecture)" ] && ! dpkg --print-foreign-architectures | grep -qx "$arch"; then
		echo "busybox.sh: adding dpkg architecture $arch" >&2
		dpkg --add-architecture "$arch"
		apt-get update -qq
	fi
	if ! apt-cache show "busybox-static:$arch" >/dev/null 2>&1; then
		apt-get update -qq
	fi
	# apt drops privileges to _apt to download; give it the directory.
	(cd "$dir" && apt-get download -qq "busybox-static:$arch" 2>&1 | grep -v 'Download is performed unsandboxed' >&2 || true)
fi
deb=$(ls "$dir"/busybox-static_*_"$arch".deb | tail -1)
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
dpkg-deb -x "$deb" "$tmp"
# A static ELF of the right machine (e_machine at offset 18).
got=$(od -An -tx1 -j18 -N2 "$tmp/bin/busybox" | tr -s ' ' | sed 's/^ //;s/ $//')
if [ "$got" != "$machine" ]; then
	echo "busybox.sh: $deb holds a busybox for machine $got, not $arch" >&2
	exit 1
fi
install -m 0755 "$tmp/bin/busybox" "$out"
echo "$out: busybox $(dpkg-deb -f "$deb" Version) $arch" >&2
