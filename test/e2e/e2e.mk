# e2e.mk: container image, chart and end-to-end targets. The Makefile
# includes this file (include test/e2e/e2e.mk).

GO        ?= go
E2E_CACHE ?= /var/cache/csi-memfs-e2e
IMAGE     ?= docker.io/csi-memfs/csi-memfs:dev

.PHONY: e2e image chart-lint deploy-manifests helm

# A real single-node cluster (etcd, apiserver, controller-manager,
# scheduler, kubelet, containerd), the chart installed with Helm, pods with
# csi-memfs volumes. Cold (Kubernetes built from source): add ~15 minutes.
e2e:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/run.sh

# The plugin image as an OCI tarball, without Docker:
#   ctr -n k8s.io images import bin/csi-memfs-image.tar
image:
	CGO_ENABLED=0 $(GO) build -trimpath -ldflags "-s -w" -o bin/csi-memfs-static ./cmd/csi-memfs
	$(GO) run ./hack/ociimage -o bin/csi-memfs-image.tar -tag $(IMAGE) \
		-file bin/csi-memfs-static:/csi-memfs -busybox $$(command -v busybox || echo /bin/busybox) \
		-entrypoint /csi-memfs -cmd serve

# helm lint, the schema's rejections, deploy/ against a fresh rendering and
# the dashboard's series.
chart-lint:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/helm.sh lint --strict charts/csi-memfs
	$(GO) test -count=1 -run 'TestChart|TestDeploy|TestDashboard' ./test/e2e/

# Regenerate deploy/csi-memfs.yaml from the chart.
deploy-manifests:
	E2E_CACHE=$(E2E_CACHE) bash hack/render-deploy.sh

# Build (once) the cached Helm the chart tests run; CI runs it before
# `make test` so that no test waits for the build.
helm:
	E2E_CACHE=$(E2E_CACHE) bash test/e2e/helm.sh version --short
