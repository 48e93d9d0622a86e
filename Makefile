# hvx developer entry points. `make demo` (setup + main job) and `make test` (all tiers)
# are the two commands the README starts with; both work on a fresh Debian bookworm
# machine as root and install what they need.
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
.DEFAULT_GOAL := build

export HVX_CACHE ?= /var/cache/hvx
export CARGO_TERM_COLOR ?= never
OUT := _out
export KUBECONFIG_HVX := $(CURDIR)/$(OUT)/kubeconfig

.PHONY: deps build generate check-generated fmt lint test test-unit test-integration \
        test-cluster e2e e2e-kind bench images chart-lint cluster-up cluster-down demo \
        guest-image deny clean

deps: ## system packages (apt, bookworm + backports)
	hack/install-deps.sh

build: deps
	cargo build --workspace --all-targets

generate: ## regenerate CRD YAML and gRPC code from their sources
	cargo run -q -p hvx-api --bin crdgen -- crds charts/hvx/files/crds
	cargo run -q -p hvx-proto --example protogen

check-generated: ## fails when committed generated files differ from their sources
	cargo test -q -p hvx-api --test crd_drift
	cargo test -q -p hvx-proto --test proto_drift

fmt:
	cargo fmt --all

lint: deps
	cargo fmt --all -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test: lint test-unit test-integration test-cluster e2e ## every tier, as CI runs it

test-unit: deps
	cargo test --workspace --exclude hvx-e2e

guest-image: deps ## the small BIOS-bootable guest the privileged tests and demo boot
	hack/build-guest.sh

test-integration: deps guest-image ## privileged: real QEMU (TCG), netns, qcow2 chains
	cargo test --workspace --exclude hvx-e2e -- --ignored --test-threads=1

test-cluster: cluster-up ## real kube-apiserver + kubelets from the local harness
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test cluster --test crds --test operator -- --test-threads=1

e2e: cluster-up images ## end to end on the local cluster (any kubeconfig works)
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test e2e -- --test-threads=1

e2e-kind: ## for users with Docker: kind cluster, images loaded, e2e run against it
	e2e/kind/e2e-kind.sh

cluster-up: deps
	e2e/harness/cluster-up.sh

cluster-down:
	e2e/harness/cluster-down.sh

images: deps
	images/build.sh

chart-lint:
	charts/lint.sh

bench: deps guest-image
	bench/run.sh

demo: cluster-up images
	hack/demo.sh

deny:
	cargo deny check

clean: cluster-down
	rm -rf target $(OUT)
