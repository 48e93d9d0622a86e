#!/usr/bin/env bash
# Builds the hvx images (operator, agent, launcher) from images/Dockerfile.*.
# Builder: Docker when a Docker engine answers, else buildah (no engine here).
# With buildah, the base image the Dockerfiles name (debian:bookworm-slim) is made
# locally with debootstrap (no registry) and cached in ${HVX_CACHE}/images.
# Images are named <registry>/hvx-{operator,agent,launcher}:<tag>: `make images
# REGISTRY=registry.example.com/team TAG=0.1.0` (defaults localhost and dev: the
# local cluster's). With the default registry they are saved as docker-archive tars
# in ${HVX_CACHE}/images/extra, which cluster-up imports into every node, and
# imported into the running local cluster's nodes right away; with another registry
# the tars go to _out/images/ and the local cluster is left alone (`make push`
# pushes them; HVX_IMAGE_LOAD=1 imports them into the local cluster too).
set -euo pipefail
REPO_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "${REPO_DIR}/e2e/harness/lib/common.sh"

IMG_DIR="${HVX_CACHE}/images"
TAG="${HVX_IMAGE_TAG:-dev}"
REGISTRY="${HVX_IMAGE_REGISTRY:-localhost}"
REGISTRY="${REGISTRY%/}"
[[ "${TAG}" =~ ^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$ ]] || die "TAG=${TAG}: not a valid image tag"
[[ "${REGISTRY}" =~ ^[a-z0-9]([a-z0-9.:-]*[a-z0-9])?(/[a-z0-9._-]+)*$ ]] || die "REGISTRY=${REGISTRY}: not a registry host[/path]"
if [[ "${REGISTRY}" == localhost ]]; then
  TAR_DIR="${IMG_DIR}/extra"; LOAD="${HVX_IMAGE_LOAD:-1}"
else
  TAR_DIR="${REPO_DIR}/_out/images"; LOAD="${HVX_IMAGE_LOAD:-0}"
fi
CARGO_TARGET="${CARGO_TARGET_DIR:-${REPO_DIR}/target}"
PROFILE="${HVX_IMAGE_PROFILE:-debug}"
mkdir -p "${IMG_DIR}/extra" "${TAR_DIR}" "${REPO_DIR}/_out/bin"

if [[ -n "${HVX_IMAGE_BUILDER:-}" ]]; then
  BUILDER="${HVX_IMAGE_BUILDER}"
elif command -v docker >/dev/null && docker info >/dev/null 2>&1; then
  BUILDER=docker
else
  BUILDER=buildah
fi
log "images: builder ${BUILDER}"

if [[ "${1:-}" == --base-only ]]; then
  [[ "${BUILDER}" == buildah ]] || die "--base-only is for buildah (Docker pulls the base image)"
  BASE_ONLY=1
fi

# 1. Binaries: whatever the operator and node-agent packages produce today.
build_binaries() {
  log "images: cargo build (${PROFILE}) -p hvx-operator -p hvx-node-agent --bins"
  profile_flag=(); [[ "${PROFILE}" == release ]] && profile_flag=(--release)
  (cd "${REPO_DIR}" && cargo build "${profile_flag[@]}" -p hvx-operator -p hvx-node-agent --bins)
  rm -f "${REPO_DIR}/_out/bin/"*
  for b in hvx-operator hvx-node-agent hvx-launcher; do
    if [[ -x "${CARGO_TARGET}/${PROFILE}/${b}" ]]; then
      cp "${CARGO_TARGET}/${PROFILE}/${b}" "${REPO_DIR}/_out/bin/${b}"
      # Debug info is most of a debug binary; images do not need it.
      strip --strip-debug "${REPO_DIR}/_out/bin/${b}"
    fi
  done
  ls "${REPO_DIR}/_out/bin"
  # The probe kernel the agent and launcher boot before trusting KVM.
  local guest
  guest="$("${REPO_DIR}/hack/build-guest.sh" | tail -n1)"
  mkdir -p "${REPO_DIR}/_out/probe"
  cp "${guest}/vmlinuz" "${REPO_DIR}/_out/probe/vmlinuz"
}

# 2. Base image (buildah only; Docker users pull it).
# Bump when the base image recipe below changes: images and caches are keyed by it.
BASE_RECIPE=2
ensure_base_image() {
  if [[ "$(buildah inspect --type image --format '{{index .OCIv1.Config.Labels "dev.hvx.base-recipe"}}' "${BASE_IMAGE}" 2>/dev/null)" == "${BASE_RECIPE}" ]]; then
    return 0
  fi
  local tar="${IMG_DIR}/base-debian-bookworm-minbase-r${BASE_RECIPE}.tar"
  if [[ ! -f "${tar}" ]]; then
    log "images: debootstrap bookworm minbase -> ${BASE_IMAGE} (cached in ${tar})"
    local root ctr mnt
    root="$(mktemp -d)"
    debootstrap --variant=minbase bookworm "${root}" http://deb.debian.org/debian >"${root}.log" 2>&1 \
      || { tail -20 "${root}.log"; rm -rf "${root}" "${root}.log"; die "debootstrap failed"; }
    rm -rf "${root}"/var/lib/apt/lists/* "${root}"/var/cache/apt/*.bin "${root}"/var/cache/apt/archives/*.deb \
      "${root}"/usr/share/doc/* "${root}"/usr/share/man/* "${root}"/usr/share/locale/* "${root}"/var/log/*.log
    ctr="$(buildah from scratch)"
    mnt="$(buildah mount "${ctr}")"
    tar -C "${root}" -cf - . | tar -C "${mnt}" -xpf -
    buildah umount "${ctr}" >/dev/null
    buildah config --cmd '["bash"]' --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
      --label "dev.hvx.base-recipe=${BASE_RECIPE}" "${ctr}"
    buildah commit --quiet --rm "${ctr}" "${BASE_IMAGE}" >/dev/null
    rm -rf "${root}" "${root}.log"
    buildah push --quiet "${BASE_IMAGE}" "docker-archive:${tar}.tmp:${BASE_IMAGE}"
    mv "${tar}.tmp" "${tar}"
  else
    log "images: loading cached base image ${tar}"
    buildah pull --quiet "docker-archive:${tar}" >/dev/null
  fi
}

build_one() {
  local component="$1" image="${REGISTRY}/hvx-$1:${TAG}" tar="${TAR_DIR}/hvx-$1.tar"
  log "images: building ${image}"
  if [[ "${BUILDER}" == docker ]]; then
    docker build -f "${REPO_DIR}/images/Dockerfile.${component}" -t "${image}" "${REPO_DIR}"
    docker save -o "${tar}" "${image}"
  else
    local old_id
    old_id="$(buildah images --quiet --no-trunc "${image}" 2>/dev/null || true)"
    buildah build --quiet --layers --isolation chroot --network host --pull=never \
      --ignorefile "${REPO_DIR}/images/Dockerfile.${component}.dockerignore" \
      -f "${REPO_DIR}/images/Dockerfile.${component}" -t "${image}" "${REPO_DIR}" >/dev/null
    # The previous build of this tag would linger as a dangling image.
    if [[ -n "${old_id}" && "${old_id}" != "$(buildah images --quiet --no-trunc "${image}")" ]]; then
      buildah rmi "${old_id}" >/dev/null 2>&1 || true
    fi
    rm -f "${tar}.tmp"
    buildah push --quiet "${image}" "docker-archive:${tar}.tmp:${image}"
    mv "${tar}.tmp" "${tar}"
  fi
}

if [[ "${BUILDER}" == buildah ]]; then ensure_base_image; fi
if [[ -n "${BASE_ONLY:-}" ]]; then log "images: base image ${BASE_IMAGE} ready"; exit 0; fi
build_binaries
components=()
[[ -x "${REPO_DIR}/_out/bin/hvx-operator" ]] && components+=(operator)
[[ -x "${REPO_DIR}/_out/bin/hvx-node-agent" ]] && components+=(agent)
[[ -x "${REPO_DIR}/_out/bin/hvx-launcher" ]] && components+=(launcher)
for c in "${components[@]}"; do build_one "${c}"; done

# 3. Into the running local cluster, if any (and asked for).
if [[ "${LOAD}" == 1 ]]; then
  for n in $(seq 1 "${NODE_COUNT}"); do
    sock="$(node_dir "${n}")/containerd.sock"
    [[ -S "${sock}" ]] || continue
    for c in "${components[@]}"; do
      import_image "${sock}" "${TAR_DIR}/hvx-${c}.tar" || die "importing hvx-${c} into $(node_name "${n}") failed"
    done
    log "images: imported ${components[*]} into $(node_name "${n}")"
  done
fi
log "images: done (${components[*]:-none} as ${REGISTRY}/hvx-*:${TAG}) -> ${TAR_DIR}"
