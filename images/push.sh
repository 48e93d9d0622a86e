#!/usr/bin/env bash
# Pushes the images `make images REGISTRY=... TAG=...` built to that registry
# (`make push REGISTRY=... TAG=...`): Docker when a Docker engine answers, else
# buildah (log in first: `docker login` / `buildah login`).
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${REPO_DIR}/e2e/harness/lib/common.sh"
TAG="${HVX_IMAGE_TAG:-dev}"
REGISTRY="${HVX_IMAGE_REGISTRY:-localhost}"
REGISTRY="${REGISTRY%/}"
[[ "${REGISTRY}" != localhost ]] || die "make push needs REGISTRY=<host>[/path] (localhost images are for the local cluster only)"
if [[ -n "${HVX_IMAGE_BUILDER:-}" ]]; then
  BUILDER="${HVX_IMAGE_BUILDER}"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  BUILDER=docker
else
  BUILDER=buildah
fi
for c in operator agent launcher; do
  image="${REGISTRY}/hvx-${c}:${TAG}"
  log "push: ${image} (${BUILDER})"
  if [[ "${BUILDER}" == docker ]]; then
    docker image inspect "${image}" >/dev/null 2>&1 || die "${image} not built: make images REGISTRY=${REGISTRY} TAG=${TAG}"
    docker push "${image}"
  else
    buildah inspect --type image "${image}" >/dev/null 2>&1 || die "${image} not built: make images REGISTRY=${REGISTRY} TAG=${TAG}"
    buildah push "${image}" "docker://${image}"
  fi
done
log "push: done; install with --set images.registry=${REGISTRY} --set images.tag=${TAG}"
