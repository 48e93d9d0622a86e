#!/usr/bin/env bash
# Storage benchmarks for hvx (well under 3 minutes). Prints one BENCH line per figure.
#
#  1. 4k random read and write IOPS of a qcow2 overlay (the options hvx uses: 128 KiB
#     clusters, extended L2, L2 cache covering the disk) over a qcow2 base, against a raw
#     file. Both are served by qemu-storage-daemon over NBD (unix socket) and driven by
#     fio's nbd engine, so both pay the same transport and only the format differs;
#     host page cache on (cache.direct=off), as QEMU runs by default.
#  2. Read IOPS of an overlay over the streamOptimized VMDK kept as is vs over the base
#     converted to qcow2: why the store converts imports once.
#  3. Import throughput of the store (copy+hash+validate+convert) vs a plain
#     `qemu-img convert`, and snapshot time of 1 GiB and 16 GiB disks
#     (storage/examples/storage_bench.rs, through hvx-storage itself).
#  4. Cold move of a stopped VM's 256 MiB overlay between two stores (chunked, digests,
#     checks, rebase, install) vs `cp` + `sync` of the layer file.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
RUNTIME=${HVX_BENCH_FIO_SECONDS:-6}
SIZE_MIB=${HVX_BENCH_SIZE_MIB:-512}

WORK=$(mktemp -d /var/tmp/hvx-bench-storage.XXXXXX)
QSD_PID=""
cleanup() {
  if [ -n "$QSD_PID" ]; then kill "$QSD_PID" 2>/dev/null || true; wait "$QSD_PID" 2>/dev/null || true; fi
  rm -rf "$WORK"
}
trap cleanup EXIT

# Serves $1 (a -blockdev JSON) as NBD export "exp" on $WORK/nbd.sock.
serve() {
  rm -f "$WORK/nbd.sock"
  qemu-storage-daemon --blockdev "$1" \
    --nbd-server "addr.type=unix,addr.path=$WORK/nbd.sock" \
    --export "type=nbd,id=exp,node-name=top,name=exp,writable=on" &
  QSD_PID=$!
  for _ in $(seq 100); do [ -S "$WORK/nbd.sock" ] && return 0; sleep 0.05; done
  echo "qemu-storage-daemon did not start" >&2; exit 1
}
stop() { kill "$QSD_PID"; wait "$QSD_PID" 2>/dev/null || true; QSD_PID=""; }

# fio 4k random $1 (read|write) on the served export; prints IOPS.
fio_iops() {
  local rw=$1 out
  out=$(fio --name=b --ioengine=nbd --uri="nbd+unix:///exp?socket=$WORK/nbd.sock" \
    --rw="rand$rw" --bs=4k --iodepth=16 --size="${SIZE_MIB}M" --runtime="$RUNTIME" --time_based \
    --output-format=json 2>/dev/null | sed -n '/^{/,$p')  # fio prints a banner first
  jq -r ".jobs[0].$rw.iops | floor" <<<"$out"
}

bench_line() { # metric unit value baseline_name baseline_value
  local ratio
  ratio=$(awk -v a="$3" -v b="$5" 'BEGIN { if (b == 0) print 0; else printf "%.3f", a / b }')
  printf 'BENCH {"group":"disk","metric":"%s","unit":"%s","value":%s,"baseline":"%s","baseline_value":%s,"ratio":%s}\n' \
    "$1" "$2" "$3" "$4" "$5" "$ratio"
}

# Test data: a raw disk full of incompressible data, its qcow2 base, an hvx overlay.
head -c "$((SIZE_MIB << 20))" /dev/urandom >"$WORK/raw.img"
qemu-img convert -q -f raw -O qcow2 "$WORK/raw.img" "$WORK/base.qcow2"
L2=$(( (SIZE_MIB << 20) / 131072 * 16 )); [ "$L2" -lt 131072 ] && L2=131072
mk_overlay() { # backing backing_fmt out
  qemu-img create -q -f qcow2 -b "$1" -F "$2" -o cluster_size=131072,extended_l2=on "$3" "${SIZE_MIB}M"
}
overlay_json() { # overlay backing backing_driver
  printf '{"driver":"qcow2","node-name":"top","l2-cache-size":%s,"file":{"driver":"file","filename":"%s"},"backing":{"driver":"%s","read-only":true,"file":{"driver":"file","filename":"%s"}}}' \
    "$L2" "$1" "$3" "$2"
}
RAW_JSON="{\"driver\":\"raw\",\"node-name\":\"top\",\"file\":{\"driver\":\"file\",\"filename\":\"$WORK/raw.img\"}}"

for rw in read write; do
  serve "$RAW_JSON"; raw=$(fio_iops "$rw"); stop
  rm -f "$WORK/ov.qcow2"; mk_overlay "$WORK/base.qcow2" qcow2 "$WORK/ov.qcow2"
  serve "$(overlay_json "$WORK/ov.qcow2" "$WORK/base.qcow2" qcow2)"; ov=$(fio_iops "$rw"); stop
  bench_line "overlay_4k_rand${rw}_iops" "IOPS" "$ov" "raw file" "$raw"
done

# Keep VMDK as backing file, or convert once? Overlay read IOPS over each.
qemu-img convert -q -f raw -O vmdk -o subformat=streamOptimized "$WORK/raw.img" "$WORK/base.vmdk"
rm -f "$WORK/ov.qcow2"; mk_overlay "$WORK/base.qcow2" qcow2 "$WORK/ov.qcow2"
serve "$(overlay_json "$WORK/ov.qcow2" "$WORK/base.qcow2" qcow2)"; conv=$(fio_iops read); stop
rm -f "$WORK/ovv.qcow2"; mk_overlay "$WORK/base.vmdk" vmdk "$WORK/ovv.qcow2"
serve "$(overlay_json "$WORK/ovv.qcow2" "$WORK/base.vmdk" vmdk)"; vmdk=$(fio_iops read); stop
bench_line "overlay_over_stream_vmdk_4k_randread_iops" "IOPS" "$vmdk" "overlay over converted qcow2 base" "$conv"

rm -f "$WORK"/*.img "$WORK"/*.qcow2 "$WORK"/*.vmdk
cd "$ROOT"
export CARGO_TARGET_DIR=${CARGO_TARGET_DIR:-$ROOT/target}
# A release build, as the agent ships: sha256 and the copy loops unoptimised would
# measure the compiler, not the store.
cargo run --release -q -p hvx-storage --example storage_bench -- "$WORK"
