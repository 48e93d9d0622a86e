#!/usr/bin/env bash
# Supply-chain checks (`make deny`, part of `make test`): licences, banned and
# duplicate crates, and that every crate comes from crates.io (deny.toml). The
# RustSec advisory database lives on GitHub; when it cannot be fetched (closed
# networks, like the machines this runs on) the advisory check is skipped with a
# notice, and runs wherever the database is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_DENY_VERSION=0.18.5
deny="$(hack/cargo-tool.sh cargo-deny "${CARGO_DENY_VERSION}")"
checks=(licenses bans sources)
if timeout 60 "${deny}" fetch db >/dev/null 2>&1; then
  checks+=(advisories)
else
  echo "deny: the RustSec advisory database is unreachable here; advisories not checked" >&2
fi
for manifest in Cargo.toml fuzz/Cargo.toml; do
  "${deny}" --log-level error --manifest-path "${manifest}" check --hide-inclusion-graph "${checks[@]}"
done
