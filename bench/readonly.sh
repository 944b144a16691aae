#!/usr/bin/env bash
# bench/readonly.sh: `find | xargs cat` of a 5000-file tree through
# read-only mounts, as an image volume serves it: the tree itself (tmpfs),
# a read-only kernel overlayfs over it (what a Kubernetes image volume
# mounts), fuse-overlayfs read-only, and `csi-memfs mount --lower -o ro`
# with and without --kernel-cache. Each round mounts every system afresh
# and walks it twice (cold, then warm); prints the median times, each
# against kernel overlayfs's, and the FUSE requests per file csi-memfs was
# sent (exact, from its own counters).
#
# Run as root:  bash bench/readonly.sh [ROUNDS (default 5)] [csi-memfs binary]
set -euo pipefail
ROUNDS=${1:-5}
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
BIN=${2:-$ROOT/bin/csi-memfs}
FILES=5000
W=$(mktemp -d /tmp/csi-memfs-readonly.XXXXXX)
pid=
cleanup() {
	[[ -z $pid ]] || { kill -TERM "$pid" 2>/dev/null; wait "$pid" 2>/dev/null || true; }
	umount "$W/mnt" 2>/dev/null || umount -l "$W/mnt" 2>/dev/null || true
	umount "$W" 2>/dev/null || umount -l "$W"
	rmdir "$W"
}
trap cleanup EXIT
mount -t tmpfs -o size=2g csi-memfs-readonly "$W"
mkdir -p "$W/lower" "$W/empty" "$W/mnt" "$W/state"
(cd "$ROOT" && go run ./bench/cmd/benchtool gentree -dir "$W/lower/tree" -n "$FILES" -seed 1) >/dev/null
have_fo=0
command -v fuse-overlayfs >/dev/null && have_fo=1
SYSTEMS=(tmpfs overlayfs)
((have_fo)) && SYSTEMS+=(fuse-overlayfs)
SYSTEMS+=(csi-memfs csi-memfs-kernel-cache)

wait_mounted() {
	for ((i = 0; i < 200; i++)); do mountpoint -q "$W/mnt" && return 0; sleep 0.05; done
	echo "$1: not mounted after 10 s" >&2
	return 1
}
mount_sys() { # sys round: mounts sys read-only on $W/mnt; the tree is $W/mnt/tree
	case $1 in
	tmpfs) mount --bind -o ro "$W/lower" "$W/mnt" ;;
	overlayfs) mount -t overlay overlay -o "ro,lowerdir=$W/lower:$W/empty" "$W/mnt" ;; # two layers: one alone takes an upper
	fuse-overlayfs)
		fuse-overlayfs -f -o "ro,lowerdir=$W/lower" "$W/mnt" 2>>"$W/fo.log" &
		pid=$!
		wait_mounted "$1"
		;;
	csi-memfs*)
		local extra=()
		[[ $1 != *kernel-cache ]] || extra=(--kernel-cache)
		CSI_MEMFS_FUSE_COUNTS=$W/counts.$1.$2 "$BIN" mount --size 64Mi --state-dir "$W/state" --lower "$W/lower" \
			-o ro "${extra[@]}" "$W/mnt" 2>>"$W/memfs.log" &
		pid=$!
		wait_mounted "$1"
		;;
	esac
}
umount_sys() {
	if [[ -n $pid ]]; then
		if [[ $1 == csi-memfs* ]]; then kill -TERM "$pid"; else umount "$W/mnt"; fi
		wait "$pid" || true
		pid=
	else
		umount "$W/mnt"
	fi
}
walk() { # seconds one find | xargs cat of the tree takes
	local t0=$EPOCHREALTIME
	(cd "$W/mnt/tree" && find . -type f -print0 | xargs -0 cat >/dev/null)
	awk -v a="$t0" -v b="$EPOCHREALTIME" 'BEGIN { printf "%.4f", b - a }'
}

: >"$W/times"
for ((r = 1; r <= ROUNDS; r++)); do
	for sys in "${SYSTEMS[@]}"; do
		if ((r == 1)) && [[ $sys == csi-memfs* ]]; then
			# A mount that walks cold only: its requests are the cold
			# walk's; the first timed round's, less these, the warm one's.
			mount_sys "$sys" cold
			walk >/dev/null
			umount_sys "$sys"
		fi
		mount_sys "$sys" "$r"
		echo "$sys cold $(walk)" >>"$W/times"
		echo "$sys warm $(walk)" >>"$W/times"
		umount_sys "$sys"
	done
	echo "round $r of $ROUNDS done (load $(cut -d' ' -f1 /proc/loadavg))" >&2
done

requests() { # counts file: its requests but FORGET, INIT and DESTROY
	awk '$1 !~ /FORGET|INIT|DESTROY/ { n += $2 } END { print n + 0 }' "$1"
}
echo "find | xargs cat of $FILES files ($(du -sh "$W/lower/tree" | cut -f1)) through read-only mounts; medians of $ROUNDS rounds; $(nproc) CPUs, $(uname -r)"
echo
echo "| system | cold, s | vs overlayfs | warm, s | vs overlayfs | FUSE requests per file, cold | warm |"
echo "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"
for sys in "${SYSTEMS[@]}"; do
	reqs="| – | –"
	if [[ $sys == csi-memfs* ]]; then
		cold=$(requests "$W/counts.$sys.cold")
		both=$(requests "$W/counts.$sys.1")
		reqs=$(awk -v c="$cold" -v b="$both" -v f="$FILES" 'BEGIN { printf "| %.3f | %.3f", c / f, (b - c) / f }')
	fi
	awk -v sys="$sys" -v reqs="$reqs" '
		function median(a, n,   i, j, t) {
			for (i = 2; i <= n; i++) for (j = i; j > 1 && a[j - 1] > a[j]; j--) { t = a[j]; a[j] = a[j - 1]; a[j - 1] = t }
			return n % 2 ? a[(n + 1) / 2] : (a[n / 2] + a[n / 2 + 1]) / 2
		}
		$1 == sys && $2 == "cold" { c[++nc] = $3 } $1 == sys && $2 == "warm" { w[++nw] = $3 }
		$1 == "overlayfs" && $2 == "cold" { oc[++noc] = $3 } $1 == "overlayfs" && $2 == "warm" { ow[++now] = $3 }
		END {
			mc = median(c, nc); mw = median(w, nw); moc = median(oc, noc); mow = median(ow, now)
			printf "| %s | %.3f | %.2fx | %.3f | %.2fx %s |\n", sys, mc, moc / mc, mw, mow / mw, reqs
		}' "$W/times"
done
