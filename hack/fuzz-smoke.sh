#!/usr/bin/env bash
# fuzz-smoke.sh [SECONDS]: runs every cargo-fuzz target for SECONDS each (default
# HVX_FUZZ_SECONDS or 20) from its committed seeds; `make test` runs it so a parser
# or renderer change that panics on hostile input fails CI. Any crash, hang (an input
# taking over 10 s) or allocation over 2 GiB fails the run; the input is kept under
# _out/fuzz/artifacts for `cargo fuzz run TARGET FILE`.
#
# Built with the repo's pinned stable compiler (RUSTC_BOOTSTRAP lets cargo-fuzz pass
# its -Z flags) and without a sanitizer: the code under test has no unsafe, what we
# look for is panics, overflows (debug assertions on) and runaway time or memory. No
# nightly toolchain needed on a fresh machine.
set -euo pipefail
cd "$(dirname "$0")/.."
CARGO_FUZZ_VERSION=0.13.1
seconds="${1:-${HVX_FUZZ_SECONDS:-20}}"
fuzz="$(hack/cargo-tool.sh cargo-fuzz "${CARGO_FUZZ_VERSION}")"
out="$(pwd)/_out/fuzz"
mkdir -p "${out}/artifacts"

# target -> committed seed directories (relative to the repo root)
declare -A seeds=(
  [ovf]="import/tests/corpus import/tests/fixtures"
  [vmx]="import/tests/fixtures"
  [manifest]="fuzz/seeds/manifest"
  [disk]="fuzz/seeds/disk"
  [tar]="fuzz/seeds/tar"
  [network]="fuzz/seeds/network"
)
export RUSTC_BOOTSTRAP=1
# The instrumented build is a few minutes cold: keep it outside the repo, like the
# other heavy builds (cargo itself knows when it is stale).
target_dir="${HVX_CACHE:-/var/cache/hvx}/fuzz-target"
cd fuzz
"${fuzz}" build --sanitizer none --debug-assertions --target-dir "${target_dir}"
failed=()
for target in ovf vmx manifest disk tar network; do
  corpus="${out}/corpus/${target}"
  mkdir -p "${corpus}"
  dirs=()
  for d in ${seeds[${target}]}; do dirs+=("../${d}"); done
  echo "fuzz-smoke: ${target} for ${seconds}s"
  if ! "${fuzz}" run --sanitizer none --debug-assertions --target-dir "${target_dir}" "${target}" "${corpus}" "${dirs[@]}" -- \
      -max_total_time="${seconds}" -timeout=10 -rss_limit_mb=2048 -max_len=300000 \
      -artifact_prefix="${out}/artifacts/${target}-" -print_final_stats=1 \
      >"${out}/${target}.log" 2>&1; then
    failed+=("${target}")
    tail -n 40 "${out}/${target}.log" >&2
  else
    grep -E '^stat::number_of_executed_units' "${out}/${target}.log" | sed "s/^/fuzz-smoke: ${target} /" || true
  fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "fuzz-smoke: FAILED: ${failed[*]} (inputs in ${out}/artifacts)" >&2
  exit 1
fi
echo "fuzz-smoke: ok"
