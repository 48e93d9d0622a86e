#!/usr/bin/env bash
# Applies examples/two-vm-app.yaml in namespace ${1:-hvx-demo} and waits until both VMs
# run with their addresses (disk import on the nodes, then boot under TCG). Prints
# the state as it changes; on timeout prints what is known and exits 1.
set -euo pipefail
cd "$(dirname "$0")/.."
source e2e/harness/versions.env
KUBECTL="${HVX_CACHE:-/var/cache/hvx}/k8s/${K8S_VERSION}/bin/kubectl"
export KUBECONFIG="${KUBECONFIG:-$PWD/_out/kubeconfig}"
NS="${1:-hvx-demo}"
"$KUBECTL" create namespace "${NS}" --dry-run=client -o yaml | "$KUBECTL" apply -f - >/dev/null
# Tenant namespaces need no more than Pod Security `baseline` (launcher pods are
# unprivileged); the sample enforces it.
"$KUBECTL" label namespace "${NS}" --overwrite pod-security.kubernetes.io/enforce=baseline >/dev/null
"$KUBECTL" -n "${NS}" apply --server-side --field-manager=hvx-sample -f examples/two-vm-app.yaml
deadline=$(( $(date +%s) + ${HVX_SAMPLE_TIMEOUT:-900} ))
last=""
while :; do
  line=$("$KUBECTL" -n "${NS}" get vmapp shop -o jsonpath='{.status.phase}{" "}{range .status.vms[*]}{.name}={.phase}@{.node}/{.interfaces[0].ipAddress} {end}' 2>/dev/null || true)
  [[ "$line" != "$last" ]] && { echo "  $line"; last="$line"; }
  if [[ "$line" == Running* ]] && ! grep -qE '/( |$)' <<<"$line"; then break; fi
  if (( $(date +%s) > deadline )); then
    echo "sample application not running in time; state:" >&2
    "$KUBECTL" -n "${NS}" get vmapp,odisk,vnet,pods -o wide >&2 || true
    "$KUBECTL" -n "${NS}" describe vmapp shop >&2 || true
    exit 1
  fi
  sleep 3
done
"$KUBECTL" -n "${NS}" get vmapp,odisk,vnet,pods -o wide
