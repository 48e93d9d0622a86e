#!/usr/bin/env bash
# `make bench`: runs every benchmark under bench/*/{run,bench}.sh and writes one table.
# Each benchmark prints lines `BENCH {json}` with fields group, metric, unit, value,
# baseline, baseline_value, ratio and optionally anchor (a published figure). This
# script collects them into _out/bench/results.{json,md} and, with --update-readme,
# replaces the table in README.md between the bench markers.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=_out/bench
mkdir -p "$OUT"
failed=()
# stray_procs: "pid comm args" of every running QEMU, qemu-img and dnsmasq (by the
# kernel's command name, exact). A leaked probe QEMU spinning a core or a leftover
# conversion would skew every number, so none may run that this script did not start.
stray_procs() {
  local d pid comm
  for d in /proc/[0-9]*; do
    pid=${d#/proc/}
    comm=$(cat "$d/comm" 2>/dev/null) || continue
    case "$comm" in
      qemu-system-x86|qemu-img|dnsmasq)
        [[ "$(awk '{print $3}' "$d/stat" 2>/dev/null)" == Z ]] && continue
        echo "$pid $comm $(tr '\0' ' ' <"$d/cmdline" 2>/dev/null | cut -c1-160)" ;;
    esac
  done
}
if [ -z "${BENCH_ALLOW_STRAYS:-}" ]; then
  strays=$(stray_procs)
  if [ -n "$strays" ]; then
    echo "bench: refusing to start: QEMU/qemu-img/dnsmasq processes this run did not start are running:" >&2
    echo "$strays" | sed 's/^/bench:   pid /' >&2
    echo "bench: stop them (kill <pid>) or set BENCH_ALLOW_STRAYS=1 to measure anyway" >&2
    exit 2
  fi
fi
# BENCH_ONLY="a b": run only those benchmarks and keep the other lines of the last run.
if [ -n "${BENCH_ONLY:-}" ]; then
  for name in $BENCH_ONLY; do
    jq -c --arg g "$name" 'select(.bench != $g)' "$OUT/lines.jsonl" >"$OUT/lines.keep" 2>/dev/null || : >"$OUT/lines.keep"
    mv "$OUT/lines.keep" "$OUT/lines.jsonl"
  done
else
  : >"$OUT/lines.jsonl"
fi
for script in bench/*/run.sh bench/*/bench.sh; do
  [ -f "$script" ] || continue
  name=$(basename "$(dirname "$script")")
  if [ -n "${BENCH_ONLY:-}" ] && [[ " $BENCH_ONLY " != *" $name "* ]]; then continue; fi
  echo "bench: $name" >&2
  start=$(date +%s)
  if bash "$script" >"$OUT/$name.log" 2>"$OUT/$name.err"; then
    grep '^BENCH ' "$OUT/$name.log" | sed 's/^BENCH //' | jq -c --arg b "$name" '. + {bench: $b}' >>"$OUT/lines.jsonl" || true
  else
    failed+=("$name")
    echo "bench: $name failed; see $OUT/$name.err" >&2
    grep '^BENCH ' "$OUT/$name.log" | sed 's/^BENCH //' | jq -c --arg b "$name" '. + {bench: $b}' >>"$OUT/lines.jsonl" || true
  fi
  echo "bench: $name took $(( $(date +%s) - start ))s" >&2
  # What a benchmark started must be gone when it ends (else the next one is skewed).
  if [ -z "${BENCH_ALLOW_STRAYS:-}" ]; then
    # Pods and VMs being deleted get 30 s to go.
    for _ in $(seq 1 30); do
      left=$(stray_procs)
      [ -z "$left" ] && break
      sleep 1
    done
    if [ -n "$left" ]; then
      echo "bench: $name left processes behind:" >&2
      echo "$left" | sed 's/^/bench:   pid /' >&2
      failed+=("$name(left processes)")
    fi
  fi
done
machine="$(nproc) cores, $(free -g | awk '/Mem:/{print $2}') GiB, $(uname -r), $(. /etc/os-release; echo "$PRETTY_NAME")"
when=$(date -u +%Y-%m-%dT%H:%MZ)
jq -s --arg machine "$machine" --arg date "$when" '{date: $date, machine: $machine, results: .}' \
  "$OUT/lines.jsonl" >"$OUT/results.json"
{
  echo "Run $when on $machine."
  echo
  echo "| group | metric | hvx | baseline | baseline value | ratio | published anchor |"
  echo "|---|---|---|---|---|---|---|"
  jq -r '.results[] | "| \(.group) | \(.metric) | \(.value) \(.unit) | \(.baseline // "-") | \(if .baseline_value == null then "-" else "\(.baseline_value) \(.unit)" end) | \(if .ratio == null then "-" else (.ratio * 100 | round / 100 | tostring) end) | \(.anchor // "-") |"' "$OUT/results.json"
} >"$OUT/results.md"
cat "$OUT/results.md"
if [ "${1:-}" = "--update-readme" ]; then
  awk -v table="$OUT/results.md" '
    /<!-- bench:start -->/ { print; while ((getline line < table) > 0) print line; skip=1; next }
    /<!-- bench:end -->/ { skip=0 }
    !skip { print }' README.md >"$OUT/README.new" && mv "$OUT/README.new" README.md
fi
if [ ${#failed[@]} -gt 0 ]; then
  echo "bench: failed: ${failed[*]}" >&2
  exit 1
fi
