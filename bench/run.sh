#!/usr/bin/env bash
# bench/run.sh: measure kernel tmpfs, kernel overlayfs, fuse-overlayfs and
# csi-memfs side by side in one run, and print a Markdown report.
#
# Run as root from anywhere:  bash bench/run.sh
# Environment (all optional):
#   BENCH_ROUNDS=N       rounds; the report shows medians (default 3; 1 quick)
#   BENCH_QUICK=1        small sizes, for a smoke run (about a minute)
#   BENCH_SYSTEMS="..."  subset of: tmpfs overlayfs fuse-overlayfs csi-memfs
#   BENCH_BIN=PATH       csi-memfs binary (default bin/csi-memfs, built if
#                        missing or older than a .go file)
#   BENCH_MEMFS_ARGS="..." extra flags for csi-memfs mount (e.g. --no-passthrough)
#   BENCH_MAX_LOAD=X     before each round, wait (up to BENCH_LOAD_WAIT
#                        seconds, default 900) until the 1-minute load
#                        average is <= X (a round itself leaves ~2 behind)
#   BENCH_RESULTS=DIR    where raw results go (default bench/results/DATE)
#   BENCH_LOWER=1        run the overlay (lower-file) section for the peers
#                        even when csi-memfs mount has no --lower yet
#
# Everything is written under mountpoints in a fresh /tmp/csi-memfs-bench.*
# directory; every mount and daemon the script started is removed on exit,
# also after a failure or ^C.
set -euo pipefail
export LC_ALL=C

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
QUICK=${BENCH_QUICK:-0}
ALL_SYSTEMS=(tmpfs overlayfs fuse-overlayfs csi-memfs)
read -r -a SYSTEMS <<<"${BENCH_SYSTEMS:-${ALL_SYSTEMS[*]}}"

if [[ $QUICK == 1 ]]; then
	ROUNDS=${BENCH_ROUNDS:-1}
	SEQ_MIB=128 RAND_MIB=64 RUNTIME=1 RAMP=0
	META_FILES=2000 TREE_FILES=500 MEM_MIB=128
	LOWER_BIG_MIB=32 LOWER_READ_MIB=128 LOWER_DIR_FILES=100
else
	ROUNDS=${BENCH_ROUNDS:-3}
	SEQ_MIB=1024 RAND_MIB=1024 RUNTIME=5 RAMP=1
	META_FILES=20000 TREE_FILES=5000 MEM_MIB=1024
	LOWER_BIG_MIB=256 LOWER_READ_MIB=1024 LOWER_DIR_FILES=1000
fi
META_DIRS=20 META_SIZE=100

log() { printf '%s %s\n' "$(date +%T)" "$*" >&2; }
die() { log "error: $*"; exit 1; }

[[ $(id -u) == 0 ]] || die "run as root (mounts tmpfs, overlayfs and FUSE)"

# --- dependencies -----------------------------------------------------------

need_pkgs=()
command -v fio >/dev/null || need_pkgs+=(fio)
command -v fuse-overlayfs >/dev/null || need_pkgs+=(fuse-overlayfs)
if ((${#need_pkgs[@]})); then
	log "installing ${need_pkgs[*]}"
	apt-get update -qq
	DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi
GO=$(command -v go || echo /usr/local/go/bin/go)
[[ -x $GO ]] || die "no Go toolchain (go in PATH or /usr/local/go/bin/go)"

BIN=${BENCH_BIN:-$ROOT/bin/csi-memfs}
have_memfs=0
if [[ " ${SYSTEMS[*]} " == *" csi-memfs "* ]]; then
	if [[ -z ${BENCH_BIN:-} ]] && { [[ ! -x $BIN ]] || [[ -n $(cd "$ROOT" && find . -name '*.go' -not -path './bench/*' -newer "$BIN" -print -quit) ]]; }; then
		log "building bin/csi-memfs"
		(cd "$ROOT" && "$GO" build -o bin/csi-memfs ./cmd/csi-memfs) || log "warning: go build ./cmd/csi-memfs failed"
	fi
	# (not "| grep -q": with pipefail, grep's early exit can fail the pipe)
	[[ ! -x $BIN ]] || MOUNT_HELP=$("$BIN" mount --help 2>&1 || true)
	if [[ ${MOUNT_HELP:-} == *-size* ]]; then
		have_memfs=1
	else
		log "warning: no working $BIN mount; csi-memfs is left out of this run"
	fi
fi
if ((!have_memfs)); then
	read -r -a SYSTEMS <<<"$(printf '%s ' "${SYSTEMS[@]}" | sed 's/csi-memfs //')"
fi
have_lower=0
if ((have_memfs)) && [[ $MOUNT_HELP == *-lower* ]]; then
	have_lower=1
fi
have_statedir=0
if ((have_memfs)) && [[ $MOUNT_HELP == *-state-dir* ]]; then
	have_statedir=1 # keep its private tmpfs instance under our work dir too
fi

# --- work directory, mounts and cleanup ------------------------------------

W=$(mktemp -d /tmp/csi-memfs-bench.XXXXXX)
STAMP=$(date +%Y%m%d-%H%M%S)
RES=${BENCH_RESULTS:-$ROOT/bench/results/$STAMP$(if [[ $QUICK == 1 ]]; then echo -quick; fi)}
mkdir -p "$RES"
RAW=$RES/raw.tsv
: >"$RAW"

MOUNTS=()              # everything we mounted, in order
declare -A MNT=()      # system -> mountpoint in use
declare -A PID=()      # system -> FUSE daemon pid
declare -A BASE=()     # system -> tmpfs holding its upper (overlays)

cleanup() {
	set +e
	local s i
	for s in "${!PID[@]}"; do stop_daemon "$s"; done
	for ((i = ${#MOUNTS[@]} - 1; i >= 0; i--)); do
		if mountpoint -q "${MOUNTS[i]}"; then
			umount "${MOUNTS[i]}" 2>/dev/null || umount -l "${MOUNTS[i]}"
		fi
	done
	# Anything still mounted under $W (e.g. the private tmpfs of a csi-memfs
	# that had to be killed), deepest first.
	awk -v w="$W/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r | while read -r m; do
		umount "$m" 2>/dev/null || umount -l "$m"
	done
	if grep -q " $W" /proc/mounts; then
		log "warning: mounts left under $W; not removing it"
	else
		rm -rf "$W"
	fi
}
trap cleanup EXIT
trap 'exit 130' INT TERM

do_mount() { # mount args... ; the last argument is the mountpoint
	mount "$@" && MOUNTS+=("${!#}")
}

tmpfs_at() { # dir size
	mkdir -p "$1" && do_mount -t tmpfs -o "size=$2" csi-memfs-bench "$1"
}

wait_mounted() { # sys mnt pid
	local i
	for ((i = 0; i < 200; i++)); do
		mountpoint -q "$2" && return 0
		kill -0 "$3" 2>/dev/null || { log "$1: daemon exited before mounting"; return 1; }
		sleep 0.1
	done
	log "$1: not mounted after 20 s"
	return 1
}

# start_sys SYS ROUND [LOWER]: a fresh, empty mount of SYS; with LOWER, an
# overlay over that directory (overlays only).
start_sys() {
	local sys=$1 r=$2 lower=${3:-} d=$W/$1 mnt
	[[ -z $lower ]] || r+=-lower
	mnt=$d/mnt.$r
	mkdir -p "$mnt"
	case $sys in
	tmpfs)
		tmpfs_at "$mnt" 4g || return 1
		;;
	overlayfs | fuse-overlayfs)
		local base=$d/base.$r
		tmpfs_at "$base" 4g || return 1
		BASE[$sys]=$base
		mkdir -p "$base"/{lower,upper,work}
		[[ -n $lower ]] || lower=$base/lower
		local o=lowerdir=$lower,upperdir=$base/upper,workdir=$base/work
		if [[ $sys == overlayfs ]]; then
			do_mount -t overlay overlay -o "$o" "$mnt" || return 1
		else
			fuse-overlayfs -f -o "$o" "$mnt" 2>>"$RES/fuse-overlayfs.log" &
			PID[$sys]=$!
			MOUNTS+=("$mnt")
			wait_mounted "$sys" "$mnt" "${PID[$sys]}" || return 1
		fi
		;;
	csi-memfs)
		local args=(mount --size 4Gi)
		if ((have_statedir)); then
			mkdir -p "$d/state.$r" && args+=(--state-dir "$d/state.$r")
		fi
		[[ -z $lower ]] || args+=(--lower "$lower")
		read -r -a extra <<<"${BENCH_MEMFS_ARGS:-}"
		args+=("${extra[@]}")
		"$BIN" "${args[@]}" "$mnt" 2>>"$RES/csi-memfs.log" &
		PID[$sys]=$!
		MOUNTS+=("$mnt")
		wait_mounted "$sys" "$mnt" "${PID[$sys]}" || return 1
		;;
	esac
	MNT[$sys]=$mnt
}

stop_daemon() { # sys: SIGTERM for csi-memfs, umount for fuse-overlayfs
	local sys=$1 pid=${PID[$1]:-} i
	[[ -n $pid ]] || return 0
	if [[ $sys == csi-memfs ]]; then
		kill -TERM "$pid" 2>/dev/null
	else
		umount "${MNT[$sys]}" 2>/dev/null || umount -l "${MNT[$sys]}" 2>/dev/null
	fi
	for ((i = 0; i < 100; i++)); do
		kill -0 "$pid" 2>/dev/null || break
		sleep 0.1
	done
	if kill -0 "$pid" 2>/dev/null; then
		log "$sys: daemon $pid did not exit in 10 s; killing it"
		kill -KILL "$pid" 2>/dev/null
	fi
	wait "$pid" 2>/dev/null
	local rc=$?
	[[ $sys != csi-memfs || $rc == 0 || $rc == 143 ]] || log "$sys: daemon exited $rc (see $RES/csi-memfs.log)"
	unset 'PID[$sys]'
}

stop_sys() {
	local sys=$1 mnt=${MNT[$1]:-}
	[[ -n $mnt ]] || return 0
	stop_daemon "$sys"
	if mountpoint -q "$mnt"; then umount "$mnt" 2>/dev/null || umount -l "$mnt"; fi
	if [[ -n ${BASE[$sys]:-} ]]; then
		umount "${BASE[$sys]}" 2>/dev/null || umount -l "${BASE[$sys]}"
		unset 'BASE[$sys]'
	fi
	unset 'MNT[$sys]'
}

# --- measuring helpers ------------------------------------------------------

ROUND=0
rec() { # metric system value
	printf '%s\t%s\t%s\t%s\n' "$ROUND" "$1" "$2" "$3" >>"$RAW"
	[[ $2 == - ]] || log "round $ROUND  $(printf '%-16s %-15s %s' "$1" "$2" "$3")"
}
now_us() { echo "${EPOCHREALTIME/./}"; }
secs() { # start_us end_us
	local d=$(($2 - $1))
	printf '%d.%06d' $((d / 1000000)) $((d % 1000000))
}
rss_mib() { awk '/^VmRSS:/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
mib_of() { awk -v b="$1" 'BEGIN { printf "%.3f", b / 1048576 }'; }
kib_to_mib() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
used_bytes() { stat -f -c '%b %f %S' "$1" | awk '{ printf "%d", ($1 - $2) * $3 }'; }
rotate() { # round: the systems, starting at a different one each round
	local n=${#SYSTEMS[@]} i
	for ((i = 0; i < n; i++)); do echo "${SYSTEMS[(i + $1) % n]}"; done
}

# fio_run SYS NAME FIELD fio-args...: prints FIELD (read_bw, write_iops, ...)
fio_run() {
	local sys=$1 name=$2 field=$3 out
	shift 3
	out=$RES/fio-r$ROUND-$sys-$name.json
	timeout 600 fio --output-format=json --output="$out" --name="$name" \
		--ioengine=psync --direct=0 --invalidate=0 --fallocate=none \
		--group_reporting "$@" >>"$RES/fio.log" 2>&1 || { log "$sys: fio $name failed"; return 1; }
	"$BT" fio "$out" | awk -v f="$field" '$1 == f { print $2 }'
}

# --- the figures --------------------------------------------------------------

bench_memory() {
	local sys=$1 mnt=${MNT[$1]} pid=${PID[$1]:-} c0 s0 c1 s1 t rc
	[[ -z $pid ]] || rec rss_before "$sys" "$(rss_mib "$pid")"
	read -r c0 s0 < <("$BT" meminfo)
	dd if=/dev/zero of="$mnt/mem.dat" bs=1M count="$MEM_MIB" status=none || return 1
	cat "$mnt/mem.dat" >/dev/null || return 1
	read -r c1 s1 < <("$BT" meminfo)
	rec cached_growth "$sys" "$(kib_to_mib $((c1 - c0)))"
	rec shmem_growth "$sys" "$(kib_to_mib $((s1 - s0)))"
	[[ -z $pid ]] || rec rss_holding "$sys" "$(rss_mib "$pid")"
	rm "$mnt/mem.dat" || return 1
	rc=0
	t=$("$BT" memback -base "$c0" -peak "$c1" -timeout 30s) || rc=$?
	((rc == 0 || rc == 4)) || return 1
	rec release "$sys" "$t"
	[[ -z $pid ]] || rec rss_after "$sys" "$(rss_mib "$pid")"
}

bench_seq() {
	local sys=$1 f=${MNT[$1]}/seq.dat v
	v=$(fio_run "$sys" seqwrite write_bw --filename="$f" --rw=write --bs=1M --size="${SEQ_MIB}M") || return 1
	rec seq_write "$sys" "$(mib_of "$v")"
	v=$(fio_run "$sys" seqread read_bw --filename="$f" --rw=read --bs=1M --size="${SEQ_MIB}M") || return 1
	rec seq_read "$sys" "$(mib_of "$v")"
	rm -f "$f"
}

bench_rand() {
	local sys=$1 f=${MNT[$1]}/rand.dat v j rw
	fio_run "$sys" layout write_bw --filename="$f" --rw=write --bs=1M --size="${RAND_MIB}M" >/dev/null || return 1
	for rw in randread randwrite; do
		for j in 1 2; do
			v=$(fio_run "$sys" "$rw-${j}j" "${rw#rand}_iops" --filename="$f" --rw="$rw" --bs=4k \
				--size="${RAND_MIB}M" --numjobs="$j" --runtime="$RUNTIME" --time_based --ramp_time="$RAMP") || return 1
			rec "$rw"_"$j"j "$sys" "$v"
		done
	done
	rm -f "$f"
}

bench_meta() {
	local sys=$1 d=${MNT[$1]}/meta name v
	mkdir "$d" || return 1
	"$BT" meta -dir "$d" -n "$META_FILES" -dirs "$META_DIRS" -size "$META_SIZE" >"$W/meta.out" || return 1
	while read -r name v; do rec "$name" "$sys" "$v"; done <"$W/meta.out"
	rmdir "$d"
}

bench_tree() {
	local sys=$1 d=${MNT[$1]}/tree t0 t1 n
	mkdir "$d" || return 1
	t0=$(now_us)
	tar -xf "$TARBALL" -C "$d" || return 1
	t1=$(now_us)
	rec untar "$sys" "$(secs "$t0" "$t1")"
	t0=$(now_us)
	(cd "$d" && find . -type f -print0 | xargs -0 cat >/dev/null) || return 1
	t1=$(now_us)
	rec cat "$sys" "$(secs "$t0" "$t1")"
	n=$(find "$d" -type f | wc -l)
	[[ $n == "$TREE_FILES" ]] || { log "$sys: untar gave $n files, want $TREE_FILES"; return 1; }
	rm -rf "$d"
}

# The lower-file cases of the overlay issue; SYS is mounted over $LOWER.
bench_lower() {
	local sys=$1 mnt=${MNT[$1]} t0 t1 v u0 u1 c s0 s1 rc n
	t0=$(now_us)
	(cd "$mnt/tree" && find . -type f -print0 | xargs -0 cat >/dev/null) || return 1
	t1=$(now_us)
	rec cat_cold "$sys" "$(secs "$t0" "$t1")"
	t0=$(now_us)
	(cd "$mnt/tree" && find . -type f -print0 | xargs -0 cat >/dev/null) || return 1
	t1=$(now_us)
	rec cat_warm "$sys" "$(secs "$t0" "$t1")"
	v=$(fio_run "$sys" lowerread read_bw --filename="$mnt/big-read" --rw=read --bs=1M --size="${LOWER_READ_MIB}M" --readonly) || return 1
	rec lower_seq_read "$sys" "$(mib_of "$v")"
	[[ $sys != tmpfs ]] || return 0 # the rest would change the lower

	local upper=${BASE[$sys]:-$mnt}
	if [[ $sys == csi-memfs ]] && ((have_statedir)); then
		# statfs of its private upper tmpfs itself, where we can see it
		upper=$(awk -v s="$W/csi-memfs/state.$ROUND-lower/" 'index($2, s) == 1 && $3 == "tmpfs" { print $2; exit }' /proc/mounts)
		[[ -n $upper ]] || upper=$mnt
	fi
	u0=$(used_bytes "$upper")
	read -r c s0 < <("$BT" meminfo)
	v=$("$BT" append "$mnt/big-append") || return 1
	u1=$(used_bytes "$upper")
	read -r c s1 < <("$BT" meminfo)
	rec append "$sys" "$(awk -v s="$v" 'BEGIN { printf "%.3f", s * 1000 }')"
	rec append_upper "$sys" "$(mib_of $((u1 - u0)))"
	rec append_shmem "$sys" "$(kib_to_mib $((s1 - s0)))"
	[[ $(stat -c %s "$mnt/big-append") == $((LOWER_BIG_MIB * 1048576 + 1)) ]] || { log "$sys: append: wrong size"; return 1; }

	rc=0
	v=$("$BT" rename "$mnt/dir" "$mnt/dir-renamed") || rc=$?
	if ((rc == 3)); then
		rec rename_exdev "$sys" 1
		t0=$(now_us)
		mv "$mnt/dir" "$mnt/dir-renamed" 2>>"$RES/rename-errors.log" || { rec rename_failed "$sys" 1; return 1; }
		t1=$(now_us)
		v=$(secs "$t0" "$t1")
	elif ((rc != 0)); then
		rec rename_failed "$sys" 1
		return 1
	else
		rec rename_exdev "$sys" 0
	fi
	rec rename_dir "$sys" "$(awk -v s="$v" 'BEGIN { printf "%.3f", s * 1000 }')"
	n=$(find "$mnt/dir-renamed" -type f | wc -l)
	[[ $n == "$LOWER_DIR_FILES" && ! -e $mnt/dir ]] || { log "$sys: rename: $n files after it"; return 1; }
}

# The FUSE requests each lower-tree workload costs csi-memfs, by operation,
# from the daemon's own counters (fusefs.CountsFileEnv: written at exit). A
# warm figure is a mount that ran the cold and the warm workload, less one
# that ran the cold alone; a cold one, less a mount that ran nothing. Prints
# "workload op count" lines.
REQ_WORKLOADS=("find+cat cold" "find+cat warm" "ls -lR cold" "ls -lR warm")
req_cmd() { # workload
	case $1 in
	find+cat*) echo 'find . -type f -print0 | xargs -0 cat >/dev/null' ;;
	ls*) echo 'ls -lR >/dev/null' ;;
	esac
}
req_counts() { # label runs...: mount over $LOWER, run each, stop; counts to $W/req.LABEL
	local label=$1 run
	shift
	export CSI_MEMFS_FUSE_COUNTS=$W/req.$label
	rm -f "$CSI_MEMFS_FUSE_COUNTS"
	start_sys csi-memfs "req-$label" "$LOWER" || { unset CSI_MEMFS_FUSE_COUNTS; return 1; }
	unset CSI_MEMFS_FUSE_COUNTS
	for run in "$@"; do
		(cd "${MNT[csi-memfs]}/tree" && sh -c "$(req_cmd "$run")") || { stop_sys csi-memfs; return 1; }
	done
	stop_sys csi-memfs
	[[ -s $W/req.$label ]] || { log "csi-memfs: no request counts written (no $CSI_MEMFS_FUSE_COUNTS support?)"; return 1; }
}
bench_requests() {
	local w base f
	# req.none: what a mount costs with no workload (the mount's own probe).
	req_counts none && req_counts cat1 "find+cat cold" && req_counts cat2 "find+cat cold" "find+cat warm" &&
		req_counts ls1 "ls -lR cold" && req_counts ls2 "ls -lR cold" "ls -lR warm" || return 1
	for w in "${REQ_WORKLOADS[@]}"; do
		case $w in
		"find+cat cold") base=none f=cat1 ;;
		"find+cat warm") base=cat1 f=cat2 ;;
		"ls -lR cold") base=none f=ls1 ;;
		"ls -lR warm") base=ls1 f=ls2 ;;
		esac
		awk -v w="$w" -v base="$W/req.$base" '
			BEGIN { while ((getline l < base) > 0) { split(l, a, " "); b[a[1]] = a[2] } }
			$1 !~ /FORGET|INIT|DESTROY/ && $2 - b[$1] > 0 { print w "\t" $1 "\t" $2 - b[$1] }' "$W/req.$f"
	done
}

# req_report: the Markdown table of bench_requests's lines in $RES/requests.tsv.
req_report() {
	local files=$1 entries=$2
	awk -F'\t' -v files="$files" -v entries="$entries" '
	{ n[$1] += $3; c[$1, $2] = $3; if (!($2 in seen)) { seen[$2] = 1; ops[++nops] = $2 } if (!($1 in wseen)) { wseen[$1] = 1; ws[++nws] = $1 } }
	END {
		printf "| workload |"; for (i = 1; i <= nops; i++) printf " %s |", ops[i]; print " total | per file or entry |"
		printf "| --- |"; for (i = 1; i <= nops; i++) printf " ---: |"; print " ---: | ---: |"
		for (j = 1; j <= nws; j++) {
			w = ws[j]; per = (w ~ /^ls/) ? entries : files
			printf "| %s |", w; for (i = 1; i <= nops; i++) printf " %d |", c[w, ops[i]]
			printf " %d | %.2f |\n", n[w], n[w] / per
		}
	}' "$RES/requests.tsv"
}

# run_case FN SYS: one measurement; a failure is logged and the run goes on.
run_case() {
	[[ -n ${MNT[$2]:-} ]] || return 0
	"$1" "$2" || log "$2: $1 failed in round $ROUND (see $RES/*.log)"
}

wait_load() {
	[[ -n ${BENCH_MAX_LOAD:-} ]] || return 0
	local waited=0 load
	while :; do
		read -r load _ </proc/loadavg
		awk -v l="$load" -v m="$BENCH_MAX_LOAD" 'BEGIN { exit !(l <= m) }' && return 0
		((waited < ${BENCH_LOAD_WAIT:-900})) || { log "load $load still > $BENCH_MAX_LOAD; going on"; return 0; }
		((waited % 60)) || log "load $load > $BENCH_MAX_LOAD; waiting"
		sleep 10
		waited=$((waited + 10))
	done
}

# --- run ----------------------------------------------------------------------

if ((have_lower)); then
	LOWER_SECTION=yes
elif [[ ${BENCH_LOWER:-} == 1 ]]; then
	LOWER_SECTION="peers only (csi-memfs mount has no --lower yet)"
else
	LOWER_SECTION="skipped (csi-memfs mount has no --lower yet)"
fi
MEMFS_VERSION="not measured"
if ((have_memfs)); then
	MEMFS_VERSION="built from commit $(cd "$ROOT" && git rev-parse --short HEAD 2>/dev/null || echo '?')"
	[[ -z $(cd "$ROOT" && git status --porcelain -- . ':!bench' ':!BENCHMARKS.md' 2>/dev/null) ]] ||
		MEMFS_VERSION+=" plus uncommitted changes"
fi
{
	echo "date: $(date -Is)"
	echo "cpus: $(nproc) x $(awk -F': ' '/^model name/ { print $2; exit }' /proc/cpuinfo)"
	echo "memory: $(awk '/^MemTotal/ { printf "%.1f GiB", $2 / 1048576 }' /proc/meminfo)"
	echo "kernel: $(uname -r)"
	echo "debian: $(cat /etc/debian_version 2>/dev/null || echo '?')"
	echo "go: $("$GO" version | awk '{ print $3 }')"
	echo "fio: $(fio --version)"
	echo "fuse-overlayfs: $(fuse-overlayfs --version 2>&1 | awk '/^fuse-overlayfs/ { print $NF; exit }')"
	echo "csi-memfs: $MEMFS_VERSION"
	echo "systems: ${SYSTEMS[*]}; rounds: $ROUNDS; quick: $QUICK; overlay (lower-file) section: $LOWER_SECTION"
	echo "command: ${BENCH_QUICK:+BENCH_QUICK=$BENCH_QUICK }${BENCH_ROUNDS:+BENCH_ROUNDS=$BENCH_ROUNDS }${BENCH_MEMFS_ARGS:+BENCH_MEMFS_ARGS=\"$BENCH_MEMFS_ARGS\" }${BENCH_MAX_LOAD:+BENCH_MAX_LOAD=$BENCH_MAX_LOAD }bash bench/run.sh"
	echo "load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
} >"$RES/machine.txt"
cat "$RES/machine.txt" >&2

log "building bench/cmd/benchtool"
BT=$W/benchtool
(cd "$ROOT" && "$GO" build -o "$BT" ./bench/cmd/benchtool)

START_US=$(now_us)
tmpfs_at "$W/scratch" 2g
"$BT" gentree -dir "$W/scratch/src" -n "$TREE_FILES" -seed 1 >"$W/tree.out"
TARBALL=$W/scratch/tree.tar
tar -C "$W/scratch/src" -cf "$TARBALL" .
ROUND=0
rec param_rounds - "$ROUNDS"
rec param_seq_mib - "$SEQ_MIB"
rec param_rand_mib - "$RAND_MIB"
rec param_runtime_s - "$RUNTIME"
rec param_meta_files - "$META_FILES"
rec param_meta_dirs - "$META_DIRS"
rec param_meta_size - "$META_SIZE"
rec param_tree_files - "$TREE_FILES"
rec param_tree_dirs - "$(awk '$1 == "dirs" { print $2 }' "$W/tree.out")"
rec param_tree_mib - "$(mib_of "$(awk '$1 == "bytes" { print $2 }' "$W/tree.out")")"
rec param_mem_held_mib - "$MEM_MIB"

for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
	wait_load
	read -r load _ </proc/loadavg
	rec load1 - "$load"
	log "round $ROUND of $ROUNDS (load $load)"
	mapfile -t order < <(rotate "$ROUND")
	for s in "${order[@]}"; do start_sys "$s" "$ROUND" || { log "$s: mount failed"; stop_sys "$s"; }; done
	for fn in bench_memory bench_seq bench_rand bench_meta bench_tree; do
		for s in "${order[@]}"; do run_case "$fn" "$s"; done
	done
	for s in "${order[@]}"; do
		[[ -z ${PID[$s]:-} ]] || rec rss_end "$s" "$(rss_mib "${PID[$s]}")"
		stop_sys "$s"
	done
done

# The overlay section: all overlays over one lower tree on tmpfs.
if ((have_lower)) || [[ ${BENCH_LOWER:-} == 1 ]]; then
	log "overlay section: building the lower tree"
	LOWER=$W/lower/data
	tmpfs_at "$W/lower" "$((LOWER_READ_MIB + LOWER_BIG_MIB + 512))m"
	mkdir -p "$LOWER/dir"
	dd if=/dev/urandom of="$LOWER/big-append" bs=1M count="$LOWER_BIG_MIB" status=none
	dd if=/dev/zero of="$LOWER/big-read" bs=1M count="$LOWER_READ_MIB" status=none
	for ((i = 0; i < LOWER_DIR_FILES; i++)); do printf 'file %d\n' "$i" >"$LOWER/dir/f$i"; done
	mkdir -p "$LOWER/tree"
	tar -xf "$TARBALL" -C "$LOWER/tree"
	rec param_lower_big_mib - "$LOWER_BIG_MIB"
	rec param_lower_read_mib - "$LOWER_READ_MIB"
	rec param_lower_dir_files - "$LOWER_DIR_FILES"
	lower_systems=()
	for s in "${SYSTEMS[@]}"; do
		[[ $s != csi-memfs ]] || ((have_lower)) && lower_systems+=("$s")
	done
	wait_load # once: these rounds are short
	for ((ROUND = 1; ROUND <= ROUNDS; ROUND++)); do
		read -r load _ </proc/loadavg
		rec load1_lower - "$load"
		log "overlay round $ROUND of $ROUNDS (load $load)"
		for ((i = 0; i < ${#lower_systems[@]}; i++)); do
			s=${lower_systems[(i + ROUND) % ${#lower_systems[@]}]}
			if [[ $s == tmpfs ]]; then
				MNT[tmpfs]=$LOWER
				run_case bench_lower tmpfs
				unset 'MNT[tmpfs]'
				continue
			fi
			start_sys "$s" "$ROUND" "$LOWER" || { log "$s: mount over the lower failed"; stop_sys "$s"; continue; }
			run_case bench_lower "$s"
			stop_sys "$s"
		done
	done
	if ((have_lower)) && [[ " ${SYSTEMS[*]} " == *" csi-memfs "* ]]; then
		log "overlay section: FUSE requests per workload (csi-memfs)"
		ROUND=requests
		bench_requests >"$RES/requests.tsv" || log "csi-memfs: request counts failed"
	fi
else
	log "overlay section skipped: $BIN mount --help shows no --lower (issue 4 not landed yet)"
fi

ROUND=0
ELAPSED=$(secs "$START_US" "$(now_us)")
echo "load average at end: $(cut -d' ' -f1-3 /proc/loadavg)" >>"$RES/machine.txt"
echo "run time: ${ELAPSED%.*} s" >>"$RES/machine.txt"
loads=$(awk -F'\t' '$2 == "load1" { printf "%s%s", sep, $4; sep = ", " }' "$RAW")
echo "1-minute load at the start of each round: $loads" >>"$RES/machine.txt"
loads=$(awk -F'\t' '$2 == "load1_lower" { printf "%s%s", sep, $4; sep = ", " }' "$RAW")
[[ -z $loads ]] || echo "1-minute load at the start of each overlay round: $loads" >>"$RES/machine.txt"

{
	echo "## Results"
	echo
	sed 's/^/    /' "$RES/machine.txt"
	echo
	echo "Overlay (lower-file) section: $LOWER_SECTION."
	"$BT" report -raw "$RAW"
	if [[ -s $RES/requests.tsv ]]; then
		echo
		echo "#### FUSE requests per workload (csi-memfs over the lower tree; the daemon's counters, exact)"
		echo
		req_report "$TREE_FILES" "$(($(find "$LOWER/tree" | wc -l) - 1))"
		echo
		echo "find + xargs cat: per file; ls -lR: per entry below the tree's root. Warm: the same workload again on the same mount. FORGET and INIT are left out."
	fi
} >"$RES/report.md"
cat "$RES/report.md"
log "raw results and report: $RES"
