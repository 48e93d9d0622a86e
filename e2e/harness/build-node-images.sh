#!/usr/bin/env bash
# Builds the images every node needs without a registry, as docker-archive tars
# in ${HVX_CACHE}/images: the pause sandbox (static C binary) and a busybox-static
# test image. Cached: a warm run returns at once.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"

IMG_DIR="${HVX_CACHE}/images"
mkdir -p "${IMG_DIR}"

# build_scratch_image TAR NAME ROOTFS_DIR CMD_JSON
build_scratch_image() {
  local tar="$1" name="$2" rootfs="$3" cmd="$4" ctr
  ctr="$(buildah from scratch)"
  buildah copy --quiet "${ctr}" "${rootfs}" / >/dev/null
  buildah config --cmd "${cmd}" --os linux --arch amd64 "${ctr}"
  buildah commit --quiet --rm "${ctr}" "${name}" >/dev/null
  rm -f "${tar}.tmp"
  buildah push --quiet "${name}" "docker-archive:${tar}.tmp:${name}"
  mv "${tar}.tmp" "${tar}"
}

work="$(mktemp -d)"
trap 'rm -rf "${work}"' EXIT

pause_key="$(sha256sum "${HARNESS_DIR}/pause/pause.c" | cut -c1-12)"
if [[ ! -f "${IMG_DIR}/pause.tar" || "$(cat "${IMG_DIR}/pause.key" 2>/dev/null)" != "${pause_key}" ]]; then
  log "images: building ${PAUSE_IMAGE} from pause/pause.c"
  mkdir -p "${work}/pause"
  gcc -static -Os -s -o "${work}/pause/pause" "${HARNESS_DIR}/pause/pause.c"
  build_scratch_image "${IMG_DIR}/pause.tar" "${PAUSE_IMAGE}" "${work}/pause" '["/pause"]'
  echo "${pause_key}" > "${IMG_DIR}/pause.key"
fi

APPLETS=(sh ls cat echo sleep wget nc httpd hostname ip ping env timeout seq mkdir nslookup grep)
busybox_key="$( (sha256sum /bin/busybox; echo "${APPLETS[*]}") | sha256sum | cut -c1-12)"
if [[ ! -f "${IMG_DIR}/e2e-busybox.tar" || "$(cat "${IMG_DIR}/e2e-busybox.key" 2>/dev/null)" != "${busybox_key}" ]]; then
  log "images: building ${TEST_IMAGE} from busybox-static"
  mkdir -p "${work}/bb/bin" "${work}/bb/tmp" "${work}/bb/www"
  cp /bin/busybox "${work}/bb/bin/busybox"
  for applet in "${APPLETS[@]}"; do
    ln -s busybox "${work}/bb/bin/${applet}"
  done
  build_scratch_image "${IMG_DIR}/e2e-busybox.tar" "${TEST_IMAGE}" "${work}/bb" '["/bin/sh"]'
  echo "${busybox_key}" > "${IMG_DIR}/e2e-busybox.key"
fi
log "images: node images ready in ${IMG_DIR}"
