#!/usr/bin/env bash
# cluster.sh: a real single-node Kubernetes cluster in one folder, for the
# csi-memfs e2e suite: etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubelet and containerd (runc, bridge CNI) on this machine.
#
#   test/e2e/cluster.sh deps        apt-get install what is missing (Debian 12)
#   test/e2e/cluster.sh up DIR      start a cluster whose every file is under DIR
#   test/e2e/cluster.sh down DIR    stop it: consumer pods, then DaemonSets, then
#                                   the processes it started (by PID), then
#                                   unmount everything under DIR
#   test/e2e/cluster.sh import DIR TARBALL...
#                                   import image tarballs into its containerd
#
# `up` writes DIR/env (source it: KUBECONFIG, KUBELET_DIR, NODE_NAME, NODE_IP,
# CONTAINERD_ADDRESS, K8S_BIN) and logs to DIR/logs. The Kubernetes binaries
# come from build-k8s.sh (cached under $E2E_CACHE). Only loopback and the
# machine's own address carry traffic: the apiserver, etcd and the
# controllers listen on 127.0.0.1, kubelet on the node address (kubelet
# refuses a loopback node IP), and the pod bridge has no gateway and no
# masquerading. Pods cannot pull: images are imported, pods use
# imagePullPolicy: Never.
#
# Facts this relies on (Debian 12 VM, no systemd, cgroup v1): cgroupfs in
# kubelet and containerd; no CAP_SYS_RESOURCE, so containerd
# restrict_oom_score_adj = true and kubelet oomScoreAdj 0; kubelet makes its
# root dir an rshared bind mount itself, so Bidirectional mount propagation
# works without touching /.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
E2E_CACHE=${E2E_CACHE:-/var/cache/csi-memfs-e2e}
NODE_NAME=${NODE_NAME:-csi-memfs-e2e}
PAUSE_IMAGE=registry.k8s.io/pause:3.10
SERVICE_CIDR=10.96.0.0/24
POD_CIDR=10.244.0.0/24

log() { echo "cluster: $*" >&2; }
die() {
	log "$*"
	exit 1
}

# node_ip prints the machine's own (non-loopback) IPv4 address.
node_ip() {
	if [ -n "${NODE_IP:-}" ]; then
		echo "$NODE_IP"
		return
	fi
	local ip
	ip=$(ip -4 -o route get 192.0.2.255 2>/dev/null | sed -n 's/.* src \([0-9.]*\).*/\1/p')
	[ -n "$ip" ] || ip=$(ip -4 -o addr show scope global | awk '{print $4}' | cut -d/ -f1 | head -1)
	[ -n "$ip" ] || die "no non-loopback IPv4 address on this machine (kubelet refuses a loopback node IP)"
	echo "$ip"
}

cmd_deps() {
	local need=() t
	for t in etcd:etcd-server containerd:containerd runc:runc busybox:busybox-static \
		openssl:openssl iptables:iptables conntrack:conntrack ip:iproute2 flock:util-linux \
		mountpoint:util-linux; do
		command -v "${t%%:*}" >/dev/null || need+=("${t##*:}")
	done
	[ -x /usr/lib/cni/bridge ] || need+=(containernetworking-plugins)
	if [ ${#need[@]} -gt 0 ]; then
		log "installing ${need[*]}"
		apt-get update -qq
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
	fi
}

# start NAME CMD...: runs CMD in its own session, logging to logs/NAME.log,
# and records its PID in pids/NAME.
start() {
	local name=$1
	shift
	setsid "$@" </dev/null >"$DIR/logs/$name.log" 2>&1 &
	echo $! >"$DIR/pids/$name"
}

# wait_for WHAT SECONDS CMD...: polls CMD until it succeeds.
wait_for() {
	local what=$1 secs=$2 i
	shift 2
	for ((i = 0; i < secs * 2; i++)); do
		if "$@" >/dev/null 2>&1; then return 0; fi
		sleep 0.5
	done
	log "timed out after ${secs}s waiting for $what; last log lines:"
	tail -n 30 "$DIR"/logs/*.log >&2 || true
	return 1
}

pki() {
	local p=$DIR/pki ip=$1
	mkdir -p "$p"
	cd "$p"
	openssl req -x509 -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout ca.key -out ca.crt \
		-days 3650 -subj /CN=csi-memfs-e2e-ca 2>/dev/null
	# cert NAME CN ORG SANS
	cert() {
		openssl req -newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes -keyout "$1.key" -out "$1.csr" \
			-subj "/CN=$2${3:+/O=$3}" 2>/dev/null
		printf 'extendedKeyUsage=serverAuth,clientAuth\nkeyUsage=critical,digitalSignature,keyEncipherment\n%s\n' \
			"${4:+subjectAltName=$4}" >"$1.ext"
		openssl x509 -req -in "$1.csr" -CA ca.crt -CAkey ca.key -CAcreateserial -out "$1.crt" -days 3650 \
			-extfile "$1.ext" 2>/dev/null
		rm -f "$1.csr" "$1.ext"
	}
	cert apiserver kube-apiserver "" \
		"IP:127.0.0.1,IP:$ip,IP:${SERVICE_CIDR%.*}.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc"
	cert admin kubernetes-admin system:masters
	cert controller-manager system:kube-controller-manager
	cert scheduler system:kube-scheduler
	cert kubelet "system:node:$NODE_NAME" system:nodes
	openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out sa.key 2>/dev/null
	openssl pkey -in sa.key -pubout -out sa.pub 2>/dev/null
	cd - >/dev/null
}

kubeconfig() { # NAME CERT
	cat >"$DIR/$1.kubeconfig" <<EOF
apiVersion: v1
kind: Config
clusters:
- name: e2e
  cluster:
    server: https://127.0.0.1:6443
    certificate-authority: $DIR/pki/ca.crt
users:
- name: $2
  user:
    client-certificate: $DIR/pki/$2.crt
    client-key: $DIR/pki/$2.key
contexts:
- name: e2e
  context: {cluster: e2e, user: $2}
current-context: e2e
EOF
}

check_ports() {
	local p
	for p in 6443 2379 2380 10248 10250 10257 10259; do
		if ss -Hltn "sport = :$p" 2>/dev/null | grep -q .; then
			die "port $p is in use: is another cluster running? (test/e2e/cluster.sh down DIR)"
		fi
	done
}

cmd_up() {
	[ $# -eq 1 ] || die "usage: cluster.sh up DIR"
	mkdir -p "$1"
	DIR=$(cd "$1" && pwd)
	local bin ip t0
	t0=$(date +%s)
	cmd_deps
	bin=$("$here/build-k8s.sh")
	K8S_BIN=$bin
	ip=$(node_ip)
	check_ports
	mkdir -p "$DIR"/{logs,pids,etcd,containerd,kubelet,pod-logs,cni/net.d,cni/ipam,csi-memfs}
	# Bidirectional mount propagation needs a shared host mount under every
	# hostPath that uses it (the plugin's state dir, outside kubelet's root):
	# make the folder an rshared bind mount of itself, as kubelet does with
	# its root dir. `down` unmounts it with everything else.
	if ! mountpoint -q "$DIR"; then
		mount --bind "$DIR" "$DIR"
	fi
	mount --make-rshared "$DIR"
	log "starting in $DIR (node $NODE_NAME at $ip, binaries $bin)"
	pki "$ip"
	kubeconfig admin admin
	kubeconfig controller-manager controller-manager
	kubeconfig scheduler scheduler
	kubeconfig kubelet kubelet

	cat >"$DIR/env" <<EOF
export KUBECONFIG=$DIR/admin.kubeconfig
export KUBELET_DIR=$DIR/kubelet
export NODE_NAME=$NODE_NAME
export NODE_IP=$ip
export CONTAINERD_ADDRESS=$DIR/containerd/containerd.sock
export K8S_BIN=$bin
export E2E_CLUSTER_DIR=$DIR
export PATH=$bin:\$PATH
EOF

	start etcd etcd --name e2e --data-dir "$DIR/etcd" \
		--listen-client-urls http://127.0.0.1:2379 --advertise-client-urls http://127.0.0.1:2379 \
		--listen-peer-urls http://127.0.0.1:2380 --initial-advertise-peer-urls http://127.0.0.1:2380 \
		--initial-cluster e2e=http://127.0.0.1:2380 --log-level warn

	# containerd: every root, state and socket under DIR.
	cat >"$DIR/cni/net.d/10-csi-memfs-e2e.conflist" <<EOF
{
  "cniVersion": "0.4.0",
  "name": "csi-memfs-e2e",
  "plugins": [
    {
      "type": "bridge",
      "bridge": "cme2e0",
      "isGateway": false,
      "ipMasq": false,
      "hairpinMode": true,
      "ipam": {
        "type": "host-local",
        "dataDir": "$DIR/cni/ipam",
        "ranges": [[{"subnet": "$POD_CIDR"}]]
      }
    },
    {"type": "loopback"}
  ]
}
EOF
	cat >"$DIR/containerd/config.toml" <<EOF
version = 2
root = "$DIR/containerd/root"
state = "$DIR/containerd/state"
disabled_plugins = ["io.containerd.snapshotter.v1.aufs", "io.containerd.snapshotter.v1.btrfs",
  "io.containerd.snapshotter.v1.devmapper", "io.containerd.snapshotter.v1.zfs"]
[grpc]
  address = "$DIR/containerd/containerd.sock"
[ttrpc]
  address = "$DIR/containerd/containerd.sock.ttrpc"
[plugins."io.containerd.grpc.v1.cri"]
  sandbox_image = "$PAUSE_IMAGE"
  restrict_oom_score_adj = true
  netns_mounts_under_state_dir = true
  enable_selinux = false
  [plugins."io.containerd.grpc.v1.cri".cni]
    bin_dir = "/usr/lib/cni"
    conf_dir = "$DIR/cni/net.d"
  [plugins."io.containerd.grpc.v1.cri".containerd]
    snapshotter = "overlayfs"
    default_runtime_name = "runc"
    [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
      runtime_type = "io.containerd.runc.v2"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
        SystemdCgroup = false
        Root = "$DIR/containerd/runc"
EOF
	start containerd containerd --config "$DIR/containerd/config.toml"

	wait_for etcd 60 etcd_health
	start kube-apiserver "$bin/kube-apiserver" \
		--bind-address=127.0.0.1 --advertise-address="$ip" --secure-port=6443 \
		--etcd-servers=http://127.0.0.1:2379 \
		--client-ca-file="$DIR/pki/ca.crt" \
		--tls-cert-file="$DIR/pki/apiserver.crt" --tls-private-key-file="$DIR/pki/apiserver.key" \
		--kubelet-client-certificate="$DIR/pki/admin.crt" --kubelet-client-key="$DIR/pki/admin.key" \
		--kubelet-preferred-address-types=InternalIP \
		--service-account-issuer=https://kubernetes.default.svc \
		--service-account-key-file="$DIR/pki/sa.pub" \
		--service-account-signing-key-file="$DIR/pki/sa.key" \
		--service-cluster-ip-range="$SERVICE_CIDR" \
		--authorization-mode=Node,RBAC \
		--enable-admission-plugins=NodeRestriction \
		--allow-privileged=true \
		--profiling=false
	wait_for kube-apiserver 120 "$bin/kubectl" --kubeconfig "$DIR/admin.kubeconfig" get --raw /readyz

	start kube-controller-manager "$bin/kube-controller-manager" \
		--kubeconfig="$DIR/controller-manager.kubeconfig" \
		--authentication-kubeconfig="$DIR/controller-manager.kubeconfig" \
		--authorization-kubeconfig="$DIR/controller-manager.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false \
		--service-account-private-key-file="$DIR/pki/sa.key" --root-ca-file="$DIR/pki/ca.crt" \
		--use-service-account-credentials=true \
		--service-cluster-ip-range="$SERVICE_CIDR"
	start kube-scheduler "$bin/kube-scheduler" \
		--kubeconfig="$DIR/scheduler.kubeconfig" \
		--authentication-kubeconfig="$DIR/scheduler.kubeconfig" \
		--authorization-kubeconfig="$DIR/scheduler.kubeconfig" \
		--bind-address=127.0.0.1 --leader-elect=false

	wait_for containerd 60 ctr --address "$DIR/containerd/containerd.sock" version
	build_pause_image
	cmd_import "$DIR" "$E2E_CACHE/pause-image.tar"

	cat >"$DIR/kubelet-config.yaml" <<EOF
apiVersion: kubelet.config.k8s.io/v1beta1
kind: KubeletConfiguration
address: $ip
port: 10250
healthzBindAddress: 127.0.0.1
healthzPort: 10248
authentication:
  anonymous: {enabled: false}
  webhook: {enabled: true}
  x509: {clientCAFile: $DIR/pki/ca.crt}
authorization: {mode: Webhook}
cgroupDriver: cgroupfs
containerRuntimeEndpoint: unix://$DIR/containerd/containerd.sock
oomScoreAdj: 0
failSwapOn: false
podLogsDir: $DIR/pod-logs
clusterDomain: cluster.local
resolvConf: /etc/resolv.conf
serializeImagePulls: false
imageGCHighThresholdPercent: 100
imageGCLowThresholdPercent: 99
evictionHard:
  memory.available: 100Mi
  nodefs.available: 1%
  imagefs.available: 1%
  nodefs.inodesFree: 1%
protectKernelDefaults: false
volumeStatsAggPeriod: 10s
EOF
	start kubelet "$bin/kubelet" \
		--config="$DIR/kubelet-config.yaml" \
		--kubeconfig="$DIR/kubelet.kubeconfig" \
		--root-dir="$DIR/kubelet" \
		--cert-dir="$DIR/kubelet/pki" \
		--hostname-override="$NODE_NAME" \
		--node-ip="$ip" \
		--v=1

	wait_for "node $NODE_NAME Ready" 180 node_ready
	# The service-account controller creates "default" asynchronously; pods
	# are refused until it exists.
	wait_for "service account default/default" 60 \
		"$bin/kubectl" --kubeconfig "$DIR/admin.kubeconfig" -n default get serviceaccount default
	log "node $NODE_NAME Ready in $(($(date +%s) - t0))s; source $DIR/env"
}

etcd_health() {
	(exec 3<>/dev/tcp/127.0.0.1/2379 && printf 'GET /health HTTP/1.0\r\n\r\n' >&3 && grep -q '"health":"true"' <&3)
}

node_ready() {
	"$K8S_BIN/kubectl" --kubeconfig "$DIR/admin.kubeconfig" get node "$NODE_NAME" \
		-o 'jsonpath={.status.conditions[?(@.type=="Ready")].status}' | grep -q True
}

# build_pause_image builds (once) the sandbox image: hack/pause as a static
# binary in a one-layer image.
build_pause_image() {
	local out=$E2E_CACHE/pause-image.tar
	[ -s "$out" ] && return 0
	local root tmp
	root=$(cd "$here/../.." && pwd)
	tmp=$(mktemp -d)
	(cd "$root" && CGO_ENABLED=0 go build -trimpath -ldflags=-s -o "$tmp/pause" ./hack/pause &&
		go run ./hack/ociimage -o "$out" -tag "$PAUSE_IMAGE" -file "$tmp/pause:/pause" -entrypoint /pause) >&2
	rm -rf "$tmp"
}

cmd_import() {
	[ $# -ge 2 ] || die "usage: cluster.sh import DIR TARBALL..."
	local dir t
	dir=$(cd "$1" && pwd)
	shift
	for t in "$@"; do
		ctr --address "$dir/containerd/containerd.sock" -n k8s.io images import --all-platforms "$t" >&2
	done
}

# alive PID NAME: PID is running the program started as NAME (not a reused
# PID).
alive() {
	[ -r "/proc/$1/cmdline" ] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q -- "$2"
}

stop_pid() { # NAME
	local f=$DIR/pids/$1 pid i
	[ -f "$f" ] || return 0
	pid=$(cat "$f")
	if alive "$pid" "$1"; then
		kill -TERM "$pid" 2>/dev/null || true
		for ((i = 0; i < 40; i++)); do
			alive "$pid" "$1" || break
			sleep 0.25
		done
		if alive "$pid" "$1"; then
			log "$1 ($pid) did not stop; killing it"
			kill -KILL "$pid" 2>/dev/null || true
		fi
	fi
	rm -f "$f"
}

cmd_down() {
	[ $# -eq 1 ] || die "usage: cluster.sh down DIR"
	[ -d "$1" ] || {
		log "$1 does not exist"
		return 0
	}
	DIR=$(cd "$1" && pwd)
	local kc=$DIR/admin.kubeconfig kubectl="" i
	[ -f "$DIR/env" ] && kubectl=$(sed -n 's/^export K8S_BIN=//p' "$DIR/env")/kubectl
	if [ -n "$kubectl" ] && [ -x "$kubectl" ] && [ -f "$DIR/pids/kube-apiserver" ] &&
		"$kubectl" --kubeconfig "$kc" get --raw /readyz >/dev/null 2>&1; then
		# Consumer pods first (their volumes need the plugin to unpublish),
		# then the DaemonSets.
		log "deleting pods not owned by a DaemonSet"
		"$kubectl" --kubeconfig "$kc" get pods -A -o \
			'jsonpath={range .items[?(@.metadata.ownerReferences[0].kind!="DaemonSet")]}{.metadata.namespace}{" "}{.metadata.name}{"\n"}{end}' 2>/dev/null |
			while read -r ns name; do
				[ -n "$name" ] && "$kubectl" --kubeconfig "$kc" -n "$ns" delete pod "$name" --wait=false >/dev/null 2>&1 || true
			done
		for ((i = 0; i < 120; i++)); do
			[ -z "$("$kubectl" --kubeconfig "$kc" get pods -A -o \
				'jsonpath={range .items[?(@.metadata.ownerReferences[0].kind!="DaemonSet")]}{.metadata.name}{"\n"}{end}' 2>/dev/null)" ] && break
			sleep 0.5
		done
		log "deleting DaemonSets"
		"$kubectl" --kubeconfig "$kc" delete daemonsets -A --all --wait=false >/dev/null 2>&1 || true
		for ((i = 0; i < 120; i++)); do
			[ -z "$("$kubectl" --kubeconfig "$kc" get pods -A -o name 2>/dev/null)" ] && break
			sleep 0.5
		done
	fi

	# kubelet first so it restarts nothing, then containers, then the rest.
	stop_pid kubelet
	kill_pod_processes
	stop_pid kube-scheduler
	stop_pid kube-controller-manager
	stop_pid kube-apiserver
	kill_shims
	stop_pid containerd
	stop_pid etcd
	unmount_all
	remove_pod_cgroups
	ip link del cme2e0 2>/dev/null || true
	log "stopped; $DIR may be removed"
}

# kill_pod_processes kills what still runs in kubelet's pod cgroups (only
# this cluster's kubelet creates kubepods on this machine).
kill_pod_processes() {
	local procs pid
	procs=$(find /sys/fs/cgroup/pids/kubepods /sys/fs/cgroup/unified/kubepods -name cgroup.procs 2>/dev/null || true)
	[ -n "$procs" ] || return 0
	for pid in $(cat $procs 2>/dev/null | sort -u); do
		kill -KILL "$pid" 2>/dev/null || true
	done
	sleep 1
}

# kill_shims stops the containerd shims this cluster's containerd started
# (their command line names its socket).
kill_shims() {
	local p
	for p in /proc/[0-9]*; do
		if tr '\0' ' ' <"$p/cmdline" 2>/dev/null | grep -q -- "-address $DIR/containerd/containerd.sock "; then
			kill -KILL "${p#/proc/}" 2>/dev/null || true
		fi
	done
}

# unmount_all unmounts every mount under DIR, deepest first.
unmount_all() {
	local m i
	for ((i = 0; i < 5; i++)); do
		mapfile -t ms < <(awk -v d="$DIR/" '{ gsub(/\\040/, " ", $5); if (index($5 "/", d) == 1) print $5 }' /proc/self/mountinfo | sort -r -u)
		[ ${#ms[@]} -gt 0 ] || return 0
		for m in "${ms[@]}"; do
			umount "$m" 2>/dev/null || umount -l "$m" 2>/dev/null || true
		done
	done
	log "could not unmount everything under $DIR:"
	awk -v d="$DIR/" 'index($5 "/", d) == 1 { print $5 }' /proc/self/mountinfo >&2
}

remove_pod_cgroups() {
	local c
	for c in /sys/fs/cgroup/*/kubepods; do
		[ -d "$c" ] || continue
		find "$c" -depth -type d -exec rmdir {} \; 2>/dev/null || true
	done
}

case ${1:-} in
deps) cmd_deps ;;
up) shift && cmd_up "$@" ;;
down) shift && cmd_down "$@" ;;
import) shift && cmd_import "$@" ;;
*) die "usage: cluster.sh deps | up DIR | down DIR | import DIR TARBALL..." ;;
esac
