# k8s-module.sh: sourced by build-k8s.sh and build-e2e-test.sh. Both build
# from k8s.io/kubernetes through the Go module proxy in a scratch module,
# which therefore share one module download ($GOMODCACHE) and build cache.
#
# `go install k8s.io/kubernetes/cmd/...@v` does not work (the kubernetes
# module replaces its staging modules with local paths), so the scratch
# module requires k8s.io/kubernetes and replaces every staging module with
# its published v0.MINOR.PATCH.

# k8s_module DIR [SERVED...]: write DIR/go.mod requiring
# k8s.io/kubernetes $K8S_VERSION. The staging modules the proxy does not
# serve at the matching version (code-generator, sample-*) become empty
# local stubs (DIR/stubs/NAME), unless listed in SERVED as MODULE@VERSION:
# those are replaced with that published version instead (e2e.test imports
# k8s.io/sample-apiserver, which the proxy serves at v0.33.5 only).
k8s_module() {
	local dir=$1 m d s v kmod staging
	shift
	mkdir -p "$dir/stubs"
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
	} >"$dir/go.mod"

	# The staging modules come from the kubernetes module's own replace block.
	(cd / && GOFLAGS= "$GO" mod download -json "k8s.io/kubernetes@$K8S_VERSION") >"$dir/download.json"
	kmod=$(sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",$/\1/p' "$dir/download.json")
	staging=$(sed -n 's#^[[:space:]]*\(k8s.io/[a-z0-9-]*\) => ./staging/.*#\1#p' "$kmod")
	[ -n "$staging" ] || { echo "k8s-module: no staging modules found in $kmod" >&2; return 1; }
	for m in $staging; do
		v=
		for s in "$@"; do
			[ "${s%@*}" = "$m" ] && v=${s#*@}
		done
		if [ -n "$v" ]; then
			echo "	$m => $m $v" >>"$dir/go.mod"
			continue
		fi
		case $m in
		k8s.io/code-generator | k8s.io/sample-*)
			d=stubs/${m#k8s.io/}
			mkdir -p "$dir/$d"
			printf 'module %s\n\ngo 1.24\n' "$m" >"$dir/$d/go.mod"
			echo "	$m => ./$d" >>"$dir/go.mod"
			;;
		*)
			echo "	$m => $m v0.${K8S_VERSION#v1.}" >>"$dir/go.mod"
			;;
		esac
	done
	echo ")" >>"$dir/go.mod"
}

# k8s_ldflags: the -ldflags that stamp $K8S_VERSION into the binaries, as
# Kubernetes' own build does.
k8s_ldflags() {
	local p minor=${K8S_VERSION#v1.} f="-s -w"
	minor=${minor%%.*}
	for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
		f+=" -X $p.gitVersion=$K8S_VERSION -X $p.gitMajor=1 -X $p.gitMinor=$minor"
		f+=" -X $p.gitTreeState=clean -X $p.buildDate=1970-01-01T00:00:00Z"
	done
	echo "$f"
}
