#!/usr/bin/env bash
# Replicated disks (issue 18): 4k random write IOPS and latency of a VM disk with
# Synchronous replication to another node beside the same disk unreplicated, in one
# run. Must run as root (network namespace).
#
# What is measured: the VM side's block layer, not a guest. A qemu-storage-daemon
# plays the VM's QEMU (the same block layer: a qcow2 overlay over a base, no host
# cache options, as hvx-launcher opens disks) and exports the disk on a Unix socket;
# fio's nbd engine writes 4k blocks at random offsets through it (queue depth 1 and
# 16, direct). Replicated: the daemon runs the mirror hvx runs in the VM's QEMU
# (`hvx_vmm::replication`: blockdev-mirror sync=top copy-mode=write-blocking, NBD
# client with TLS-PSK and reconnect-delay), in sync before fio starts, into a replica
# served as the agent serves it (`replica::daemon_args`: qemu-storage-daemon,
# TLS-PSK, writethrough export) in its own network namespace over a veth. Each case
# starts from a fresh overlay (first writes allocate clusters in both).
# A guest under TCG would measure the emulator, not the disk path.
set -euo pipefail
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
RUNTIME=${HVX_BENCH_FIO_SECONDS:-10}
WORK=$(mktemp -d /tmp/hvx-bench-repl.XXXXXX)
n=$(( $$ % 100000 ))
NS=hvxbr$n
VETH=br${n}h
PEER=br${n}p
HOST_IP=10.213.93.1
REPLICA_IP=10.213.93.2
PORT=10809
PIDS=()
cleanup() {
  for p in "${PIDS[@]}"; do kill -KILL "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  ip link del "$VETH" 2>/dev/null || true
  ip netns del "$NS" 2>/dev/null || true
  rm -rf "$WORK"
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || { echo "bench/replication: needs root" >&2; exit 1; }

bench_line() { # metric unit value baseline_name baseline_value
  local ratio
  ratio=$(awk -v a="$3" -v b="$5" 'BEGIN { if (b == 0) print 0; else printf "%.3f", a / b }')
  printf 'BENCH {"group":"replication","metric":"%s","unit":"%s","value":%s,"baseline":"%s","baseline_value":%s,"ratio":%s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$ratio"
}

# The replica node: its own network namespace, reached over a veth.
ip netns add "$NS"
ip link add "$VETH" type veth peer name "$PEER"
ip link set "$PEER" netns "$NS"
ip addr add "$HOST_IP/24" dev "$VETH"
ip link set "$VETH" up
ip netns exec "$NS" ip addr add "$REPLICA_IP/24" dev "$PEER"
ip netns exec "$NS" ip link set "$PEER" up
ip netns exec "$NS" ip link set lo up

qemu-img create -q -f qcow2 "$WORK/base.qcow2" 1G
mkdir -m 700 "$WORK/tls"
printf 'hvx-migration:%s\n' "$(head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n')" >"$WORK/tls/keys.psk"
chmod 600 "$WORK/tls/keys.psk"

qmp() { # socket json-command... -> the responses
  { printf '{"execute":"qmp_capabilities"}\n'; for c in "${@:2}"; do printf '%s\n' "$c"; done; sleep 0.3; } |
    socat -t2 - "UNIX-CONNECT:$1"
}

wait_for() { # what command...
  local what=$1; shift
  for _ in $(seq 1 200); do "$@" && return 0; sleep 0.05; done
  echo "bench/replication: $what did not happen" >&2; return 1
}

# One case: fresh overlays, the VM side (and its mirror when replicated), fio.
# Writes "iops_qd1 p50_us_qd1 p99_us_qd1 iops_qd16" to $WORK/<case>.res.
run_case() { # none|sync|sync-nowt (sync, export without writethrough: what the flush costs)
  local mode=$1 d=$WORK/$1 wt=on
  [ "$mode" = sync-nowt ] && wt=off
  mkdir -p "$d"
  qemu-img create -q -f qcow2 -F qcow2 -b "$WORK/base.qcow2" "$d/vm.qcow2"
  if [ "$mode" != none ]; then
    qemu-img create -q -f qcow2 -F qcow2 -b "$WORK/base.qcow2" "$d/replica.qcow2"
    ip netns exec "$NS" qemu-storage-daemon \
      --object "tls-creds-psk,id=tls0,endpoint=server,dir=$WORK/tls" \
      --blockdev "{\"driver\":\"qcow2\",\"node-name\":\"l-top\",\"file\":{\"driver\":\"file\",\"filename\":\"$d/replica.qcow2\"}}" \
      --nbd-server "addr.type=inet,addr.host=$REPLICA_IP,addr.port=$PORT,tls-creds=tls0" \
      --export "type=nbd,id=replica,node-name=l-top,name=disk-boot,writable=on,writethrough=$wt" \
      2>"$d/replica.err" &
    PIDS+=($!)
    wait_for "replica listening" bash -c "ip netns exec $NS bash -c '</dev/tcp/$REPLICA_IP/$PORT' 2>/dev/null"
  fi
  qemu-storage-daemon \
    --chardev "socket,id=qmp,path=$d/qmp.sock,server=on,wait=off" --monitor chardev=qmp \
    --blockdev "{\"driver\":\"qcow2\",\"node-name\":\"disk-boot\",\"file\":{\"driver\":\"file\",\"filename\":\"$d/vm.qcow2\"}}" \
    --nbd-server "addr.type=unix,addr.path=$d/guest.sock" \
    --export "type=nbd,id=guest,node-name=disk-boot,name=guest,writable=on" \
    2>"$d/vm.err" &
  PIDS+=($!)
  wait_for "VM side QMP" test -S "$d/qmp.sock"
  if [ "$mode" != none ]; then
    # The export's writes go through the mirror's filter (it takes over every parent
    # of the disk node, as it does the guest device's).
    qmp "$d/qmp.sock" \
      "{\"execute\":\"object-add\",\"arguments\":{\"qom-type\":\"tls-creds-psk\",\"id\":\"hvx-rep-tls-boot\",\"dir\":\"$WORK/tls\",\"endpoint\":\"client\",\"username\":\"hvx-migration\"}}" \
      "{\"execute\":\"blockdev-add\",\"arguments\":{\"driver\":\"nbd\",\"node-name\":\"rep-boot\",\"server\":{\"type\":\"inet\",\"host\":\"$REPLICA_IP\",\"port\":\"$PORT\"},\"export\":\"disk-boot\",\"tls-creds\":\"hvx-rep-tls-boot\",\"reconnect-delay\":5}}" \
      "{\"execute\":\"blockdev-mirror\",\"arguments\":{\"job-id\":\"rep-boot\",\"device\":\"disk-boot\",\"target\":\"rep-boot\",\"sync\":\"top\",\"copy-mode\":\"write-blocking\",\"on-source-error\":\"report\",\"on-target-error\":\"report\",\"auto-dismiss\":false}}" \
      >"$d/qmp.log"
    wait_for "mirror ready" bash -c "$(declare -f qmp); qmp '$d/qmp.sock' '{\"execute\":\"query-block-jobs\"}' | grep -q '\"ready\": *true'"
  fi
  local out qd
  for qd in 1 16; do
    fio --name=randwrite --ioengine=nbd --uri="nbd+unix:///guest?socket=$d/guest.sock" \
      --rw=randwrite --bs=4k --iodepth=$qd --direct=1 --time_based --runtime="$RUNTIME" \
      --randrepeat=0 --output-format=json 2>"$d/fio-$qd.err" |
      sed -n '/^{/,$p' >"$d/fio-$qd.json" # fio's nbd engine says "connected" first
  done
  if [ "$mode" != none ]; then
    # Still in sync after the load: every write went to the replica.
    qmp "$d/qmp.sock" '{"execute":"query-block-jobs"}' | grep -q '"ready": *true' ||
      { echo "bench/replication: the mirror did not stay in sync" >&2; cat "$d/qmp.log" >&2; return 1; }
  fi
  { jq -r '.jobs[0].write | "\(.iops) \(.clat_ns.percentile["50.000000"] / 1000) \(.clat_ns.percentile["99.000000"] / 1000)"' "$d/fio-1.json" | tr '\n' ' '
    jq -r '.jobs[0].write.iops' "$d/fio-16.json"; } >"$WORK/$mode.res"
  for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  PIDS=()
}

run_case none
run_case sync
run_case sync-nowt
read -r none_iops1 none_p50 none_p99 none_iops16 <"$WORK/none.res"
read -r sync_iops1 sync_p50 sync_p99 sync_iops16 <"$WORK/sync.res"
read -r nowt_iops1 nowt_p50 nowt_p99 nowt_iops16 <"$WORK/sync-nowt.res"
echo "unreplicated: qd1 ${none_iops1} IOPS p50 ${none_p50} us p99 ${none_p99} us; qd16 ${none_iops16} IOPS" >&2
echo "synchronous:  qd1 ${sync_iops1} IOPS p50 ${sync_p50} us p99 ${sync_p99} us; qd16 ${sync_iops16} IOPS" >&2
bench_line "sync_replicated_4k_randwrite_qd1_iops" "IOPS" "$sync_iops1" "unreplicated" "$none_iops1"
bench_line "sync_replicated_4k_randwrite_qd16_iops" "IOPS" "$sync_iops16" "unreplicated" "$none_iops16"
bench_line "sync_replicated_4k_randwrite_qd1_p50_latency_us" "us" "$sync_p50" "unreplicated" "$none_p50"
bench_line "sync_replicated_4k_randwrite_qd1_p99_latency_us" "us" "$sync_p99" "unreplicated" "$none_p99"
# Where the cost is: the same mirror into an export that does not flush each write.
echo "sync, replica without writethrough: qd1 ${nowt_iops1} IOPS p50 ${nowt_p50} us p99 ${nowt_p99} us; qd16 ${nowt_iops16} IOPS" >&2
bench_line "sync_no_writethrough_4k_randwrite_qd1_iops" "IOPS" "$nowt_iops1" "unreplicated" "$none_iops1"
bench_line "sync_no_writethrough_4k_randwrite_qd16_iops" "IOPS" "$nowt_iops16" "unreplicated" "$none_iops16"
