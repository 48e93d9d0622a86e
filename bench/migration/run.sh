#!/usr/bin/env bash
# Live migration: downtime and total time of hvx's migration (TLS-PSK, top overlay
# mirrored over NBD) beside raw QEMU-to-QEMU migration of the same running guest on the
# same link, for idle 512 MiB and 1 GiB guests and a guest dirtying memory
# (vmm/examples/migration_bench.rs). Ping loss at switchover is measured by the e2e
# drain test (e2e/tests/migrate.rs), which prints it.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
cd "$ROOT"
GUEST=$(hack/build-guest.sh | tail -n1) cargo run -q -p hvx-vmm --example migration_bench
