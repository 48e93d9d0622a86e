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
        test-cluster e2e e2e-kind bench images push chart-package chart-lint cluster-up cluster-down demo \
        guest-image deny clean cluster-down-check fuzz fuzz-smoke test-mark

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
	cd fuzz && cargo fmt -- --check
	cargo clippy --workspace --all-targets -- -D warnings

test: test-mark lint check-generated deny test-unit fuzz-smoke test-integration test-cluster chart-lint e2e cluster-down-check ## every tier, as CI runs it

test-mark: ## when this run began: cluster-down-check fails on QEMU/qemu-img/dnsmasq/shim/kubelet processes started since
	mkdir -p $(OUT) && date +%s > $(OUT)/test-started

test-unit: deps
	cargo test --workspace --exclude hvx-e2e

guest-image: deps ## the small BIOS-bootable guest the privileged tests and demo boot
	hack/build-guest.sh

test-integration: deps guest-image ## privileged: real QEMU (TCG), netns, qcow2 chains
	env -u KUBECONFIG cargo test --workspace --exclude hvx-e2e --exclude kubectl-hvx -- --ignored --test-threads=1

test-cluster: cluster-up ## real kube-apiserver + kubelets from the local harness
	# These tests run their own operator in-process: an installed one (a cluster kept
	# from an earlier e2e or demo) would act on their objects too.
	KUBECONFIG=$(KUBECONFIG_HVX) hack/helm-uninstall.sh
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test crds --test operator --test access --test lostnode -- --test-threads=1
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p kubectl-hvx --test cluster -- --ignored --test-threads=1

e2e: cluster-up images ## end to end on real kubelets: helm install, the two-VM example on the overlay, kubectl drain live-migrating a VM, an OVA imported with --upload, helm uninstall
	KUBECONFIG=$(KUBECONFIG_HVX) hack/helm-install.sh
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p kubectl-hvx --test doctor -- --ignored --test-threads=1
	KUBECONFIG=$(KUBECONFIG_HVX) hack/samples-server.sh
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test vms -- --test-threads=1 --nocapture
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test migrate -- --test-threads=1 --nocapture
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test cluster -- --test-threads=1
	KUBECONFIG=$(KUBECONFIG_HVX) hack/e2e-ova.sh
	KUBECONFIG=$(KUBECONFIG_HVX) hack/run-sample.sh hvx-e2e-uninstall
	KUBECONFIG=$(KUBECONFIG_HVX) hack/helm-uninstall.sh

cluster-down-check: ## tears the cluster down and checks nothing is left (process, netns, mount)
	KUBECONFIG=$(KUBECONFIG_HVX) cargo test -p hvx-e2e --test cluster -- --ignored cluster_down_leaves_nothing

e2e-kind: ## for users with Docker: kind cluster, images loaded, e2e run against it
	e2e/kind/e2e-kind.sh

cluster-up: deps
	e2e/harness/cluster-up.sh

cluster-down:
	e2e/harness/cluster-down.sh

# Image coordinates: <REGISTRY>/hvx-{operator,agent,launcher}:<TAG>. The defaults are
# the local cluster's; a release uses TAG=$(VERSION) (the chart's appVersion).
REGISTRY ?= localhost
TAG ?= dev
VERSION := $(shell sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)

images: deps ## images <REGISTRY>/hvx-*:<TAG> (buildah here, Docker where an engine answers)
	HVX_IMAGE_REGISTRY=$(REGISTRY) HVX_IMAGE_TAG=$(TAG) images/build.sh

push: ## push the images `make images REGISTRY=... TAG=...` built
	HVX_IMAGE_REGISTRY=$(REGISTRY) HVX_IMAGE_TAG=$(TAG) images/push.sh

chart-package: ## charts/hvx as _out/hvx-$(VERSION).tgz (push: helm push _out/hvx-$(VERSION).tgz oci://REGISTRY/charts)
	mkdir -p $(OUT) && $(HVX_CACHE)/k8s/$$(sed -n 's/^K8S_VERSION=//p' e2e/harness/versions.env)/bin/helm package charts/hvx -d $(OUT)

chart-lint:
	charts/lint.sh

bench: deps guest-image cluster-up images
	bench/run.sh

demo: cluster-up images
	KUBECONFIG=$(KUBECONFIG_HVX) hack/demo.sh

deny: deps ## licences, bans, sources (and RustSec advisories where the database is reachable)
	hack/deny.sh

fuzz-smoke: deps ## every fuzz target for 20 s from its seeds (HVX_FUZZ_SECONDS to change)
	hack/fuzz-smoke.sh

fuzz: ## every fuzz target for 10 minutes
	hack/fuzz-smoke.sh 600

clean: cluster-down
	rm -rf target $(OUT)
