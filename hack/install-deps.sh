#!/usr/bin/env bash
# Installs every system package hvx's build, tests and demo need on a Debian
# bookworm machine (run as root). Idempotent: a second run only checks.
set -euo pipefail

need_root() { [ "$(id -u)" = 0 ] || { echo "install-deps: must run as root" >&2; exit 1; }; }
need_root

BACKPORTS=/etc/apt/sources.list.d/hvx-bookworm-backports.sources
if ! grep -rqs bookworm-backports /etc/apt/sources.list /etc/apt/sources.list.d/; then
  cat >"$BACKPORTS" <<'SRC'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm-backports
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
SRC
fi

# Packages from bookworm itself.
PKGS=(
  build-essential pkg-config protobuf-compiler git curl ca-certificates jq
  iproute2 bridge-utils nftables iptables dnsmasq-base iperf3 iputils-ping socat tcpdump
  etcd-server containerd runc containernetworking-plugins conntrack ebtables ethtool
  buildah debootstrap fuse-overlayfs
  busybox-static extlinux syslinux syslinux-common mtools dosfstools e2fsprogs cpio zstd xz-utils
  ovmf openssl util-linux kmod file fio procps python3
)
# Packages taken from bookworm-backports (QEMU 10 has the newest VMware device models
# and migration fixes; the 6.12 cloud kernel is the guest kernel the tests boot).
BPO=(qemu-system-x86 qemu-utils qemu-block-extra seabios ipxe-qemu)

missing=()
for p in "${PKGS[@]}" "${BPO[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  echo "install-deps: installing ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${PKGS[@]}" >/dev/null
  apt-get install -y -qq --no-install-recommends -t bookworm-backports "${BPO[@]}" >/dev/null
fi
echo "install-deps: ok ($(qemu-system-x86_64 --version | head -1))"
