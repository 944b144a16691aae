# csi-memfs. Every target runs as root on Linux with /dev/fuse (tests mount
# real tmpfs and FUSE file systems).

GO       ?= go
BIN      := bin/csi-memfs
FUZZTIME ?= 20s
# The one version of a release: the chart's appVersion (Chart.yaml), which
# is also its version, the image tag and what `csi-memfs` reports.
VERSION  := $(shell sed -n 's/^appVersion: *"\{0,1\}\([^"]*\)"\{0,1\} *$$/\1/p' charts/csi-memfs/Chart.yaml)
LDFLAGS  := -X main.buildVersion=$(VERSION)

.PHONY: all build demo test test-slow fuzz bench lint clean

all: build

build:
	$(GO) build -trimpath -ldflags "$(LDFLAGS)" -o $(BIN) ./cmd/csi-memfs

# The main job: mount a memory volume on a local directory, use it, unmount.
demo: build
	bash hack/demo.sh $(BIN)

# The tests: race detector on, fuzz seed corpora included.
test: lint
	$(GO) test -race -count=1 -timeout 20m ./...

# Slower suites CI also runs: every fuzz target for FUZZTIME each, and the
# crash loop of the plugin (ten SIGKILLs, one a second).
test-slow: fuzz
	CSI_MEMFS_SLOW=1 $(GO) test -race -count=1 -run '^TestCrashLoopLeaksNothing$$' ./driver/

fuzz:
	$(GO) test -run '^$$' -fuzz '^FuzzOps$$' -fuzztime $(FUZZTIME) ./memfs/
	$(GO) test -run '^$$' -fuzz '^FuzzOracle$$' -fuzztime $(FUZZTIME) ./overlay/
	$(GO) test -run '^$$' -fuzz '^FuzzFlatten$$' -fuzztime $(FUZZTIME) -fuzzminimizetime 100x ./image/
	$(GO) test -run '^$$' -fuzz '^FuzzCredentialProviderConfig$$' -fuzztime $(FUZZTIME) ./image/
	$(GO) test -run '^$$' -fuzz '^FuzzCredentialProviderResponse$$' -fuzztime $(FUZZTIME) ./image/

bench: build
	bash bench/run.sh

lint:
	@test -z "$$(gofmt -l $$(git ls-files '*.go'))" || { gofmt -l $$(git ls-files '*.go'); echo 'gofmt: files above need formatting'; exit 1; }
	$(GO) vet ./...
	$(GO) mod tidy -diff

clean:
	rm -rf bin

# e2e, image, release-dry-run, chart-lint, deploy-manifests, helm,
# docs-diagrams.
include test/e2e/e2e.mk
