#!/usr/bin/env bash
# Operator at scale: RSS and reconcile latency with 1000 VmApplications on the local
# cluster (make cluster-up), baselines measured in the same run (idle RSS, API server
# create latency). See e2e/examples/operator_bench.rs.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
export KUBECONFIG=${KUBECONFIG:-$ROOT/_out/kubeconfig}
[ -f "$KUBECONFIG" ] || { echo "operator bench: no cluster ($KUBECONFIG); run make cluster-up" >&2; exit 1; }
cargo build -q -p hvx-operator --bin hvx-operator
cargo run -q -p hvx-e2e --example operator_bench -- "${HVX_BENCH_APPS:-1000}"
