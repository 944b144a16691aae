# e2e.mk: container image, chart and end-to-end targets. The Makefile
# includes this file (include test/e2e/e2e.mk).

GO         ?= go
E2E_CACHE  ?= /var/cache/csi-memfs-e2e
# IMAGE_REPO is the chart's image.repository (values.yaml); the tag is the
# chart's appVersion, VERSION (Makefile), so the chart's default image is
# the one `make image` builds (TestReleaseImageIndex).
IMAGE_REPO ?= docker.io/csi-memfs/csi-memfs
IMAGE      ?= $(IMAGE_REPO):$(VERSION)
ARCHES     ?= amd64 arm64
RELEASE    ?= bin/release
HELM       := E2E_CACHE=$(E2E_CACHE) bash test/e2e/helm.sh

comma := ,
space := $(subst ,, )
PLATFORMS = $(subst $(space),$(comma),$(patsubst %,linux/%,$(ARCHES)))

.PHONY: e2e e2e-test-binary image image-binaries image-index release-dry-run version chart-lint promtool deploy-manifests helm docs-diagrams

# A real single-node cluster (etcd, apiserver, controller-manager,
# scheduler, kubelet, containerd), the chart installed with Helm, pods with
# csi-memfs volumes, Kubernetes' External Storage suite. Cold (Kubernetes
# and its e2e.test built from source): add ~15 minutes plus e2e.test's
# build. run.sh builds agnhost and e2e.test (e2e-test-binary's scripts) in the
# background while it builds the images and starts the cluster, after the
# Kubernetes binaries: both compile the same k8s.io packages, which the
# second build takes from the build cache (at the same time, both would
# compile them, on the same 2 cores).
e2e:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/run.sh

# Build (once per machine, cached in $(E2E_CACHE)) Kubernetes' e2e.test at
# the cluster's version, which TestExternalStorageSuite runs, and the
# agnhost its specs' pods run: test/e2e/build-e2e-test.sh,
# build-agnhost.sh. `make e2e` builds them too (run.sh).
e2e-test-binary:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/build-agnhost.sh
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/build-e2e-test.sh

# The plugin image, without Docker: an OCI layout tarball holding the image
# index $(IMAGE) with an image per architecture (static csi-memfs
# cross-compiled with CGO_ENABLED=0 GOARCH=..., Debian's static busybox of
# that architecture, hack/busybox.sh). Load it with
#   ctr -n k8s.io images import bin/release/csi-memfs-image-$(VERSION).oci.tar
# or push it with crane push (see .github/workflows/release.yml).
image: image-binaries image-index

image-binaries:
	set -e; for a in $(ARCHES); do \
		CGO_ENABLED=0 GOOS=linux GOARCH=$$a $(GO) build -trimpath -ldflags "-s -w $(LDFLAGS)" \
			-o $(RELEASE)/linux-$$a/csi-memfs ./cmd/csi-memfs; \
		[ -x $(RELEASE)/linux-$$a/busybox ] || bash hack/busybox.sh $$a $(RELEASE)/linux-$$a/busybox; \
	done

# The index from the binaries in $(RELEASE)/linux-ARCH/.
image-index:
	$(GO) run ./hack/ociimage -o $(RELEASE)/csi-memfs-image-$(VERSION).oci.tar -tag $(IMAGE) -platform $(PLATFORMS) \
		-file '$(RELEASE)/linux-{arch}/csi-memfs:/csi-memfs' -busybox '$(RELEASE)/linux-{arch}/busybox' \
		-entrypoint /csi-memfs -cmd serve

# Every build step of a release, into $(RELEASE), pushing nothing: the
# image index, the chart packaged with the same version, the chart's OCI
# artifact as `helm push` makes it (pushed to a throwaway registry on
# 127.0.0.1 and read back, hack/release), and SHA256SUMS. The release
# workflow (.github/workflows/release.yml) runs this, then pushes.
release-dry-run: image
	rm -f $(RELEASE)/*.tgz $(RELEASE)/csi-memfs-chart-*.oci.tar $(RELEASE)/SHA256SUMS
	$(HELM) package charts/csi-memfs --version $(VERSION) --app-version $(VERSION) -d $(RELEASE)
	E2E_CACHE=$(E2E_CACHE) $(GO) run ./hack/release -version $(VERSION) -image-repo $(IMAGE_REPO) -platforms $(PLATFORMS) \
		-image $(RELEASE)/csi-memfs-image-$(VERSION).oci.tar -chart $(RELEASE)/csi-memfs-$(VERSION).tgz \
		-chart-artifact $(RELEASE)/csi-memfs-chart-$(VERSION).oci.tar -helm "bash test/e2e/helm.sh"
	set -e; cd $(RELEASE); for a in $(ARCHES); do cp linux-$$a/csi-memfs csi-memfs-linux-$$a; done; \
		sha256sum csi-memfs-image-$(VERSION).oci.tar csi-memfs-$(VERSION).tgz csi-memfs-chart-$(VERSION).oci.tar \
			$(patsubst %,csi-memfs-linux-%,$(ARCHES)) >SHA256SUMS; cat SHA256SUMS

version:
	@echo $(VERSION)

# docs/*.svg from the Graphviz sources beside them (apt-get install
# graphviz); TestDocsDiagrams fails when one is stale.
docs-diagrams:
	set -e; for f in docs/*.dot; do dot -Tsvg "$$f" -o "$${f%.dot}.svg"; done

# helm lint, the schema's rejections, deploy/ against a fresh rendering and
# the dashboard's series.
chart-lint:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/helm.sh lint --strict charts/csi-memfs
	$(GO) test -count=1 -run 'TestChart|TestDeploy|TestDashboard|TestRelease|TestAlert|TestDocs' ./test/e2e/

# Regenerate deploy/csi-memfs.yaml from the chart.
deploy-manifests:
	E2E_CACHE=$(E2E_CACHE) bash hack/render-deploy.sh

# Build (once) the cached Helm the chart tests run; CI runs it before
# `make test` so that no test waits for the build.
helm:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/helm.sh version --short
