#!/usr/bin/env bash
# Mounts a 64Mi memory volume with `csi-memfs mount`, uses it as a pod
# would, and unmounts it. Usage: hack/demo.sh [path/to/csi-memfs]
set -euo pipefail
bin=${1:-bin/csi-memfs}
mnt=$(mktemp -d /tmp/csi-memfs-demo.XXXXXX)
"$bin" mount --size 64Mi "$mnt" &
pid=$!
cleanup() { kill "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; rmdir "$mnt" 2>/dev/null || true; }
trap cleanup EXIT
for _ in $(seq 50); do mountpoint -q "$mnt" && break; sleep 0.1; done
mountpoint -q "$mnt" || { echo "demo: $mnt was not mounted" >&2; exit 1; }

set -x
df -h "$mnt"
echo 'hello from memory' > "$mnt/greeting"
cat "$mnt/greeting"
mkdir -p "$mnt/app/config" && echo 'debug: false' > "$mnt/app/config/settings.yaml"
# Seal the config file like a memfd: no more writes, growth or shrinking.
if command -v setfattr >/dev/null && command -v getfattr >/dev/null; then
	setfattr -n user.memfs.seals -v write,grow,shrink,seal "$mnt/app/config/settings.yaml"
	getfattr -n user.memfs.seals "$mnt/app/config/settings.yaml"
elif command -v python3 >/dev/null; then
	python3 -c 'import os,sys; os.setxattr(sys.argv[1], "user.memfs.seals", b"write,grow,shrink,seal"); print("seals:", os.getxattr(sys.argv[1], "user.memfs.seals").decode())' "$mnt/app/config/settings.yaml"
else
	echo "demo: no setfattr (apt-get install attr) or python3: skipping the seal"
fi
echo 'debug: true' > "$mnt/app/config/settings.yaml" || echo "the write was refused: the file is sealed"
dd if=/dev/zero of="$mnt/fill" bs=1M count=100 2>&1 | tail -1 || true
df -h "$mnt"
rm "$mnt/fill"
ls -la "$mnt" "$mnt/app/config"
