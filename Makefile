# Petrel: the two commands of the README, plus the pieces they are made of.
# `make demo` runs the main job on the embedded default; `make test` runs every test.

CARGO ?= cargo
FUZZ_SECONDS ?= 20

.PHONY: demo test build bench unit-and-e2e fuzz-smoke lint clean-labs module-cycles

build:
	$(CARGO) build --workspace --bins

demo: build
	$(CARGO) run -q -p petrel-e2e --bin petrel-demo

# The full benchmark (as root, several minutes): Petrel beside kernel VXLAN and boringtun, streams,
# WAN, failover, hub scale and attacks; prints a table and writes JSON. See docs/performance.md.
# petrel-bench (the bench/ crate) runs petrel-gateway, petrel-edge-agent and petrel-loadgen from
# its own directory, so the whole workspace's binaries are built in release.
bench:
	$(CARGO) build --release --workspace --bins
	target/release/petrel-bench

# Every test: unit, property, end-to-end (network namespaces need root), and a bounded fuzz run,
# after the module-layering check (no import cycle between the modules of any crate).
test: build module-cycles unit-and-e2e fuzz-smoke

module-cycles:
	python3 .ci/module-cycles --self-test
	python3 .ci/module-cycles

unit-and-e2e:
	$(CARGO) test --workspace --no-fail-fast

fuzz-smoke:
	bash fuzz/run-all.sh $(FUZZ_SECONDS)

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

# Remove network-namespace labs left behind by a crashed test run.
clean-labs: build
	$(CARGO) run -q -p petrel-e2e --bin petrel-lab -- cleanup

# Mutation testing (cargo-mutants) of the protocol and the gateway's pure modules: a table of
# caught/missed mutants per file; fails on a missed mutant not in mutants-accepted.txt. Slow
# (hours on 2 cores, see docs/testing.md); MUTANTS_FILES="path ..." narrows it.
.PHONY: mutants
mutants:
	bash .ci/mutants

# OCI image archives of both binaries, offline (no base image; the binary and exactly the shared
# libraries it loads): target/image/petrel-{gateway,edge-agent}-<version>.oci.tar, named
# localhost/petrel/<binary>:<version> (deploy/kustomization.yaml points at the gateway's), then
# a smoke test that runs each from its own unpacked root file system (root: chroot).
# See docs/operations.md, "Images".
IMAGE_VERSION ?= $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
IMAGE_REPO ?= localhost/petrel
IMAGE_SOURCE ?= $(shell sed -n 's/^repository = "\(.*\)"/\1/p' Cargo.toml | head -n 1)
.PHONY: image image-test
image:
	PETREL_GIT_REVISION=$$(git rev-parse HEAD 2>/dev/null) $(CARGO) build --release -p petrel-gateway -p petrel-edge-agent --bins
	bash deploy/image/build-oci.sh --binary target/release/petrel-gateway --name $(IMAGE_REPO)/petrel-gateway \
	  --tag $(IMAGE_VERSION) --user 65532:65532 --revision "$$(git rev-parse HEAD 2>/dev/null)" --source "$(IMAGE_SOURCE)" \
	  --out target/image/petrel-gateway-$(IMAGE_VERSION).oci.tar
	bash deploy/image/build-oci.sh --binary target/release/petrel-edge-agent --name $(IMAGE_REPO)/petrel-edge-agent \
	  --tag $(IMAGE_VERSION) --user 0:0 --revision "$$(git rev-parse HEAD 2>/dev/null)" --source "$(IMAGE_SOURCE)" \
	  --out target/image/petrel-edge-agent-$(IMAGE_VERSION).oci.tar
	bash deploy/image/smoke.sh target/image/petrel-gateway-$(IMAGE_VERSION).oci.tar \
	  target/image/petrel-edge-agent-$(IMAGE_VERSION).oci.tar

image-test:
	bash deploy/image/smoke.sh target/image/petrel-gateway-$(IMAGE_VERSION).oci.tar \
	  target/image/petrel-edge-agent-$(IMAGE_VERSION).oci.tar
