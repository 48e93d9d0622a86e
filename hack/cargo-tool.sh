#!/usr/bin/env bash
# cargo-tool.sh NAME VERSION: prints the path of a cargo-installed tool, installing it
# first into ${HVX_CACHE}/tools/NAME-VERSION (keyed by version, outside the repo, so
# a second run or a CI machine with the cache warm takes no time).
set -euo pipefail
name="$1" version="$2"
root="${HVX_CACHE:-/var/cache/hvx}/tools/${name}-${version}"
bin="${root}/bin/${name}"
if [[ ! -x "${bin}" ]]; then
  echo "cargo-tool: installing ${name} ${version} into ${root}" >&2
  # Outside the repo: its rust-toolchain.toml must not pick the tool's compiler.
  (cd /tmp && cargo install --quiet --locked --root "${root}" "${name}@${version}") >&2
fi
echo "${bin}"
