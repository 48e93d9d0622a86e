#!/usr/bin/env bash
# e2e of the lift-and-shift path: the sample VMware application exported as an OVA
# (cli/examples/sample_ova.rs), imported with `kubectl hvx import --upload` (disks go
# through the API server's service proxy into the hvx upload endpoint, which keeps
# them on two nodes' agents), and run on the local cluster until both VMs have their
# DHCP addresses. The operator pod is killed in the middle of the upload: the same
# command, run again, resumes it (nothing was kept in the pod). Then deleted.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
KUBECTL="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin/kubectl"
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"
NS=hvx-e2e-ova
log() { printf '[%s] %s\n' "$(date +%H:%M:%S)" "$*"; }
GUEST="$(hack/build-guest.sh | tail -1)"
mkdir -p _out
cargo run -q -p kubectl-hvx --example sample_ova -- "${GUEST}/disk-stream.vmdk" _out/sample-shop.ova >/dev/null
log "sample OVA: _out/sample-shop.ova ($(stat -c %s _out/sample-shop.ova) bytes)"
"$KUBECTL" delete namespace "${NS}" --ignore-not-found --wait=true --timeout=300s >/dev/null
"$KUBECTL" create namespace "${NS}" >/dev/null
"$KUBECTL" label namespace "${NS}" pod-security.kubernetes.io/enforce=baseline >/dev/null
cargo run -q -p kubectl-hvx -- import _out/sample-shop.ova --dry-run
# Uploads act as the user: a ServiceAccount with only the built-in `edit` role in
# this namespace (the harness's admin kubeconfig holds a client certificate, which
# the upload endpoint cannot review; `--upload-token` carries a token instead).
"$KUBECTL" -n "${NS}" create serviceaccount importer >/dev/null
"$KUBECTL" -n "${NS}" create rolebinding importer-edit --clusterrole=edit --serviceaccount="${NS}:importer" >/dev/null
HVX_UPLOAD_TOKEN="$("$KUBECTL" -n "${NS}" create token importer --duration=1h)"
export HVX_UPLOAD_TOKEN
HVX_NS="${HVX_NAMESPACE:-hvx-system}"
IMPORT=(cargo run -q -p kubectl-hvx -- -n "${NS}" import _out/sample-shop.ova --upload --subnet "VM Network=10.66.0.0/24")
cargo build -q -p kubectl-hvx
# Small chunks (128 KiB) make the upload last long enough to be cut.
export HVX_UPLOAD_CHUNK_BYTES=131072
log "kubectl hvx import --upload (uploading as ${NS}:importer); the operator pod is killed mid-upload"
"${IMPORT[@]}" > _out/e2e-ova-import-1.log 2>&1 &
IMPORT_PID=$!
deadline=$(( $(date +%s) + 300 ))
until "$KUBECTL" -n "${NS}" get odisk -o jsonpath='{range .items[*]}{.status.bytesDone}{" "}{end}' 2>/dev/null | grep -qE '[1-9]'; do
  if ! kill -0 "$IMPORT_PID" 2>/dev/null; then
    cat _out/e2e-ova-import-1.log >&2
    log "the upload ended before the operator pod could be killed"; exit 1
  fi
  (( $(date +%s) > deadline )) && { log "no upload progress in 300 s"; exit 1; }
  sleep 0.2
done
"$KUBECTL" -n "${NS}" get odisk -o custom-columns=NAME:.metadata.name,PHASE:.status.phase,DONE:.status.bytesDone,TOTAL:.status.bytesTotal
# The disk whose upload the killed pod started.
CUT=$("$KUBECTL" -n "${NS}" get odisk -o jsonpath='{range .items[*]}{.metadata.name}{" "}{.status.bytesDone}{"\n"}{end}' | awk '$2 > 0 {print $1; exit}')
[[ -n "${CUT}" ]] || { log "no disk shows uploaded bytes"; exit 1; }
"$KUBECTL" -n "${HVX_NS}" delete pod -l app.kubernetes.io/name=hvx,app.kubernetes.io/component=operator --force --grace-period=0 >/dev/null 2>&1
log "operator pod killed while ${CUT} was uploading"
if wait "$IMPORT_PID"; then
  log "the interrupted command went on by itself (its requests reached the new operator pod)"
else
  log "the interrupted command gave up: $(tail -1 _out/e2e-ova-import-1.log)"
fi
"$KUBECTL" -n "${HVX_NS}" wait pod -l app.kubernetes.io/name=hvx,app.kubernetes.io/component=operator --for=condition=Ready --timeout=180s >/dev/null
log "the same command again: it resumes from what the nodes hold"
"${IMPORT[@]}"
unset HVX_UPLOAD_TOKEN HVX_UPLOAD_CHUNK_BYTES
# The new operator pod completed the upload the killed one had started: nothing of
# it was kept in the old pod.
"$KUBECTL" -n "${HVX_NS}" logs deploy/hvx-operator | grep 'upload complete' | grep -qF "${NS}/${CUT}" \
  || { log "the new operator pod did not complete the upload of ${CUT}"; exit 1; }
log "the new operator pod completed the upload of ${CUT} from what the nodes held"
# Every disk is complete on the nodes (the new operator read it from the agents).
deadline=$(( $(date +%s) + 120 ))
until [[ -z "$("$KUBECTL" -n "${NS}" get odisk -o jsonpath='{range .items[*]}{.status.phase}{"\n"}{end}' | grep -E '^(WaitingForUpload|)$' || true)" ]]; do
  (( $(date +%s) > deadline )) && { "$KUBECTL" -n "${NS}" get odisk -o yaml >&2; log "disks still wait for their upload"; exit 1; }
  sleep 2
done
APP=$("$KUBECTL" -n "${NS}" get vmapp -o jsonpath='{.items[0].metadata.name}')
log "application ${APP}: waiting for both VMs with addresses"
deadline=$(( $(date +%s) + 900 )); last=""
while :; do
  line=$("$KUBECTL" -n "${NS}" get vmapp "${APP}" -o jsonpath='{.status.phase}{" "}{range .status.vms[*]}{.name}={.phase}@{.node}/{.interfaces[0].ipAddress} {end}' 2>/dev/null || true)
  [[ "$line" != "$last" ]] && { echo "  $line"; last="$line"; }
  if [[ "$line" == Running* ]] && ! grep -qE '/( |$)' <<<"$line"; then break; fi
  if (( $(date +%s) > deadline )); then
    "$KUBECTL" -n "${NS}" get vmapp,odisk,vnet,pods -o wide >&2 || true
    "$KUBECTL" -n "${NS}" get odisk -o yaml | grep -A8 'status:' >&2 || true
    log "imported application not running in 900 s"; exit 1
  fi
  sleep 3
done
"$KUBECTL" -n "${NS}" get vmapp,odisk,vnet,pods -o wide
# The guests see the VMware identity the OVA carried.
for d in /run/hvx/nodes/*/vms/*/serial.log; do grep -h 'HVX-GUEST nic' "$d" || true; done | grep -q '00:50:56:a2:00:0' \
  || { log "guests do not show the OVA's MACs"; exit 1; }
"$KUBECTL" delete namespace "${NS}" --wait=true --timeout=300s >/dev/null
log "OVA imported with --upload and ran; namespace deleted"
