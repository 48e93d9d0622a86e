#!/usr/bin/env bash
# Overlay benchmark (root): overlay vs plain veth underlay throughput and latency,
# and FDB convergence after MAC moves. Prints `BENCH {json}` lines; < 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ "$(id -u)" = 0 ] || { echo "bench/overlay: needs root (network namespaces)" >&2; exit 1; }
cargo run -q -p hvx-overlay --example overlay_bench
