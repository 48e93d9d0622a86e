#!/usr/bin/env bash
# For users with Docker: creates (or reuses) the kind cluster of e2e/kind-config.yaml,
# loads the test image and the hvx images into it, and runs the e2e tests against
# its kubeconfig. kind and kubectl are the harness's pinned builds (from their Go
# modules) unless KIND / KUBECTL say otherwise.
set -euo pipefail
# shellcheck source=../harness/lib/common.sh
source "$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/harness/lib/common.sh"

if ! { command -v docker >/dev/null && docker info >/dev/null 2>&1; }; then
  die "e2e-kind needs a running Docker engine (on machines without one use: make cluster-up test-cluster e2e)"
fi

"${HARNESS_DIR}/build-k8s.sh"
KIND="${KIND:-${BIN_DIR}/kind}"
export KUBECTL="${KUBECTL:-${BIN_DIR}/kubectl}"
CLUSTER_NAME=hvx
KIND_KUBECONFIG="${OUT_DIR}/kind-kubeconfig"
mkdir -p "${OUT_DIR}"

if ! "${KIND}" get clusters 2>/dev/null | grep -qx "${CLUSTER_NAME}"; then
  log "e2e-kind: creating kind cluster ${CLUSTER_NAME}"
  "${KIND}" create cluster --config "${REPO_DIR}/e2e/kind-config.yaml" --kubeconfig "${KIND_KUBECONFIG}" --wait 5m
else
  "${KIND}" get kubeconfig --name "${CLUSTER_NAME}" > "${KIND_KUBECONFIG}"
fi

# Test image: busybox-static from this machine (the same tar the local harness uses).
"${HARNESS_DIR}/build-node-images.sh"
"${KIND}" load image-archive --name "${CLUSTER_NAME}" "${HVX_CACHE}/images/e2e-busybox.tar"
# hvx images, built with Docker from images/Dockerfile.*.
HVX_IMAGE_BUILDER=docker "${REPO_DIR}/images/build.sh"
for tar in "${HVX_CACHE}"/images/extra/*.tar; do
  [[ -f "${tar}" ]] && "${KIND}" load image-archive --name "${CLUSTER_NAME}" "${tar}"
done

log "e2e-kind: running tests against ${KIND_KUBECONFIG}"
cd "${REPO_DIR}"
export KUBECONFIG="${KIND_KUBECONFIG}"
cargo test -p hvx-e2e --test cluster -- --test-threads=1
for t in crds e2e; do
  if [[ -f "${REPO_DIR}/e2e/tests/${t}.rs" ]]; then
    cargo test -p hvx-e2e --test "${t}" -- --test-threads=1
  fi
done
log "e2e-kind: done (delete with: ${KIND} delete cluster --name ${CLUSTER_NAME})"
