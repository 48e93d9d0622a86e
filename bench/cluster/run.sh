#!/usr/bin/env bash
# Cluster benchmarks: hvx installed with Helm on the local cluster (make cluster-up,
# images), the sample disk served, then VM start latency over 20 VMs and the operator
# at 1000 objects. See vmstart.py and e2e/examples/operator_bench.rs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
source e2e/harness/versions.env
export KUBECTL="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin/kubectl"
export KUBECONFIG=${KUBECONFIG:-$ROOT/_out/kubeconfig}
[ -f "$KUBECONFIG" ] || { echo "cluster bench: no cluster ($KUBECONFIG); run make cluster-up" >&2; exit 1; }
hack/helm-install.sh >&2
hack/samples-server.sh >&2
GUEST=$(hack/build-guest.sh | tail -1) python3 bench/cluster/vmstart.py
# The operator bench runs its own operator against the API server: uninstall first so
# the two do not share objects.
hack/helm-uninstall.sh >&2
# Release builds, as shipped: a debug operator spends most of its time decoding JSON,
# which no user runs.
cargo build --release -q -p hvx-operator --bin hvx-operator
HVX_OPERATOR_BIN="${CARGO_TARGET_DIR:-target}/release/hvx-operator" \
  cargo run --release -q -p hvx-e2e --example operator_bench -- "${HVX_BENCH_APPS:-1000}"
