#!/usr/bin/env bash
# bench/bigdir.sh: rm -rf of an N-entry lower directory through a
# `csi-memfs mount --lower`, and a cold stat of a name in it against one in
# a 10-entry directory; prints the rate and the FUSE requests it cost.
#
# Run as root:  bash bench/bigdir.sh [N (default 200000)] [csi-memfs binary]
set -euo pipefail
N=${1:-200000}
BIN=${2:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/bin/csi-memfs}
W=$(mktemp -d /tmp/csi-memfs-bigdir.XXXXXX)
pid=
cleanup() {
	[[ -z $pid ]] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
	umount "$W/mnt" 2>/dev/null || true
	umount "$W" 2>/dev/null || umount -l "$W"
	rmdir "$W"
}
trap cleanup EXIT
mount -t tmpfs -o size=2g csi-memfs-bigdir "$W"
mkdir -p "$W/lower/big" "$W/lower/small" "$W/mnt" "$W/state"
(cd "$W/lower/big" && seq -f 'f%.0f' 1 "$N" | xargs touch)
(cd "$W/lower/small" && touch a b c d e f g h i j)
CSI_MEMFS_FUSE_COUNTS=$W/counts "$BIN" mount --size 1Gi --inodes 2000000 --state-dir "$W/state" --lower "$W/lower" "$W/mnt" 2>"$W/log" &
pid=$!
for ((i = 0; i < 200; i++)); do mountpoint -q "$W/mnt" && break; sleep 0.1; done
python3 - "$W/mnt" <<'PY'
import os, sys, time
m = sys.argv[1]
def cold(d, names):  # names never looked up: a LOOKUP each
    s = time.perf_counter()
    for nm in names:
        os.stat(os.path.join(d, nm))
    return (time.perf_counter() - s) / len(names) * 1e6
print("cold stat: %.1f us in the big directory, %.1f us in a 10-entry one" % (
    cold(m + "/big", ["f%d" % i for i in range(1, 201)]), cold(m + "/small", list("abcdefghij"))))
PY
t0=$EPOCHREALTIME
rm -rf "$W/mnt/big"
t1=$EPOCHREALTIME
awk -v n="$N" -v a="$t0" -v b="$t1" 'BEGIN { printf "rm -rf of %d entries: %.1f s, %.0f entries/s\n", n, b - a, n / (b - a) }'
kill -TERM "$pid"
wait "$pid" || true
pid=
echo "requests: $(tr '\n' ' ' <"$W/counts")"
