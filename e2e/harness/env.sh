# Source this to use the local cluster from a shell:
#   source e2e/harness/env.sh && kubectl get nodes && helm version
# Puts the pinned kubectl, helm, kind (and the other components) first on PATH and
# points KUBECONFIG at the local cluster's admin kubeconfig.
# shellcheck shell=bash
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
export PATH="${BIN_DIR}:${PATH}"
export KUBECONFIG="${KUBECONFIG_OUT}"
