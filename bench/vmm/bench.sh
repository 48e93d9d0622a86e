#!/usr/bin/env bash
# VM start latency: hvx-launcher vs plain QEMU with the same command line (TCG, the
# test guest on a qcow2 overlay over its streamOptimized VMDK). Median of 3 runs each.
# Prints one BENCH line per metric:
#   start_to_qmp_running_s       process start -> QMP query-status says "running"
#   start_to_first_serial_line_s process start -> first complete line on ttyS0
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
RUNS=${RUNS:-3}

GUEST=$("$ROOT/hack/build-guest.sh" | tail -n1)
cargo build -q -p hvx-node-agent --bin hvx-launcher
LAUNCHER=$CARGO_TARGET_DIR/debug/hvx-launcher
WORK=$(mktemp -d /tmp/hvx-bench-vmm.XXXXXX)
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  for f in "$WORK"/*/run/qemu.pid; do [ -f "$f" ] && kill -KILL "$(cat "$f")" 2>/dev/null || true; done
  rm -rf "$WORK"
}
trap cleanup EXIT

now() { date +%s.%N; }
qmp_running() { # socket
  printf '{"execute":"qmp_capabilities"}\n{"execute":"query-status"}\n' |
    timeout 2 socat -t1 - "UNIX-CONNECT:$1" 2>/dev/null | grep -q '"status": *"running"'
}
first_line() { [ -f "$1" ] && grep -q . "$1" 2>/dev/null && [ "$(tr -cd '\n' <"$1" | wc -c)" -ge 1 ]; }

spec() { # dir
  qemu-img create -q -f qcow2 -F vmdk -b "$GUEST/disk-stream.vmdk" "$1/boot.qcow2"
  cat >"$1/spec.json" <<JSON
{"name":"bench","cpu":{"sockets":1,"cores":2},"memory_mib":256,"accelerator":"tcg",
 "disks":[{"name":"boot","path":"$1/boot.qcow2","controller":"pvscsi","unit":0,"boot_order":1}],
 "nics":[{"name":"ethernet0","model":"vmxnet3","mac":"00:50:56:00:be:01","backend":{"user":{}}}],
 "run_dir":"$1/run","restart_policy":{"policy":"never"},"shutdown_timeout_s":1}
JSON
}

measure() { # kind run -> prints "qmp serial"
  local d=$WORK/$1-$2; mkdir -p "$d"; spec "$d"
  local t0 pid tq="" ts=""
  if [ "$1" = launcher ]; then
    t0=$(now); "$LAUNCHER" run --spec "$d/spec.json" 2>"$d/launcher.log" & pid=$!
  else
    mkdir -p "$d/run"
    # One argument per line: SMBIOS strings contain spaces.
    mapfile -t argv < <("$LAUNCHER" argv --json --spec "$d/spec.json" | jq -r '.[]')
    t0=$(now); "${argv[@]}" 2>"$d/qemu.log" & pid=$!
  fi
  PIDS+=("$pid")
  for _ in $(seq 1 3000); do
    [ -z "$tq" ] && qmp_running "$d/run/qmp-probe.sock" && tq=$(now)
    [ -z "$ts" ] && first_line "$d/run/serial.log" && ts=$(now)
    [ -n "$tq" ] && [ -n "$ts" ] && break
    sleep 0.02
  done
  kill -TERM "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  [ -f "$d/run/qemu.pid" ] && kill -KILL "$(cat "$d/run/qemu.pid")" 2>/dev/null || true
  if [ -z "$tq" ] || [ -z "$ts" ]; then
    echo "bench vmm: $1 run $2 never got running (see $d)" >&2
    cat "$d"/*.log >&2 || true
    exit 1
  fi
  echo "$(echo "$tq - $t0" | bc -l) $(echo "$ts - $t0" | bc -l)"
}

median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

declare -A Q S
for kind in launcher qemu; do
  qs=(); ss=()
  for i in $(seq 1 "$RUNS"); do
    read -r q s < <(measure "$kind" "$i")
    qs+=("$q"); ss+=("$s")
  done
  Q[$kind]=$(median "${qs[@]}"); S[$kind]=$(median "${ss[@]}")
done
for m in qmp serial; do
  if [ $m = qmp ]; then x=${Q[launcher]} y=${Q[qemu]} name=start_to_qmp_running_s
  else x=${S[launcher]} y=${S[qemu]} name=start_to_first_serial_line_s; fi
  printf 'BENCH {"group":"vm-start","metric":"%s","unit":"s","value":%.3f,"baseline":"plain QEMU","baseline_value":%.3f,"ratio":%.3f}\n' \
    "$name" "$x" "$y" "$(echo "$x / $y" | bc -l)"
done
