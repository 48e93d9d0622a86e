#!/usr/bin/env bash
# e2e of the lift-and-shift path: the sample VMware application exported as an OVA
# (cli/examples/sample_ova.rs), imported with `kubectl hvx import --upload` (disks go
# through the API server's service proxy into the hvx upload endpoint), and run on
# the local cluster until both VMs have their DHCP addresses. Then deleted.
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
log "kubectl hvx import --upload (uploading as ${NS}:importer)"
cargo run -q -p kubectl-hvx -- -n "${NS}" import _out/sample-shop.ova --upload --subnet "VM Network=10.66.0.0/24"
unset HVX_UPLOAD_TOKEN
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
