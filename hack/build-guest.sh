#!/usr/bin/env bash
# Builds the hvx test guest: a small BIOS-bootable disk that behaves like a tiny VMware
# VM (see guest/README.md for its serial protocol), from Debian packages only.
#
#   hack/build-guest.sh            # prints the cache directory as its last stdout line
#
# Output, cached in ${HVX_CACHE:-/var/cache/hvx}/guest/<key>/ (key = hash of this script,
# guest/ and the package versions; a warm run only prints the path):
#   disk.raw           MBR disk: p1 FAT16 boot (syslinux, kernel, initramfs), p2 ext4 "hvxdata"
#   disk-stream.vmdk   the same disk as a streamOptimized VMDK (what VMware exports)
#   vmlinuz, initrd.gz the guest kernel and initramfs (for -kernel boots, e.g. accelerator probes)
#   README             the serial protocol (copy of guest/README.md)
#
# Nothing here needs root, loop devices or mounts: mkfs/mtools/syslinux write into the
# image at partition offsets. Network: apt only (apt-get download of the kernel package).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
GUEST_SRC=$ROOT/guest
CACHE=${HVX_CACHE:-/var/cache/hvx}/guest
KERNEL_META=linux-image-amd64 # the generic kernel: cloud kernels lack e1000(e)/mptsas

log() { echo "build-guest: $*" >&2; }
die() { log "error: $*"; exit 1; }

for tool in apt-get apt-cache dpkg-deb depmod cpio gzip mkfs.vfat mkfs.ext4 mcopy syslinux qemu-img busybox sha256sum; do
  command -v "$tool" >/dev/null || die "missing tool $tool (run hack/install-deps.sh)"
done
BUSYBOX=$(command -v busybox)
file -L "$BUSYBOX" | grep -q 'statically linked' || die "$BUSYBOX is not static (install busybox-static)"
SYSLINUX_MBR=/usr/lib/syslinux/mbr/mbr.bin
[ -r "$SYSLINUX_MBR" ] || die "missing $SYSLINUX_MBR (install syslinux-common)"

# The versioned kernel package the meta package points at today.
KPKG=$(apt-cache depends "$KERNEL_META" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}')
[ -n "$KPKG" ] || die "cannot resolve $KERNEL_META (apt-get update?)"
KVER_PKG=$(apt-cache policy "$KPKG" | awk '/Candidate:/ {print $2}')
KREL=${KPKG#linux-image-}

KEY=$( {
  sha256sum "${BASH_SOURCE[0]}"
  (cd "$GUEST_SRC" && find . -type f | LC_ALL=C sort | xargs sha256sum)
  echo "$KPKG $KVER_PKG"
  dpkg-query -W -f='${Package} ${Version}\n' busybox-static syslinux syslinux-common
} | sha256sum | cut -c1-16)
OUT=$CACHE/$KEY

if [ -f "$OUT/.complete" ]; then
  log "cached"
  echo "$OUT"
  exit 0
fi

mkdir -p "$CACHE"
WORK=$(mktemp -d "$CACHE/.build.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
T0=$(date +%s)

# --- kernel + modules from the Debian package (no install on the host) ---
log "fetching $KPKG $KVER_PKG"
DEBS=$CACHE/debs
mkdir -p "$DEBS"
if ! ls "$DEBS/${KPKG}_"*.deb >/dev/null 2>&1; then
  (cd "$WORK" && apt-get download "$KPKG" >&2 ) || die "apt-get download $KPKG failed"
  mv "$WORK"/*.deb "$DEBS/"
fi
dpkg-deb -x "$(ls "$DEBS/${KPKG}_"*.deb | head -n1)" "$WORK/k"
depmod -b "$WORK/k" "$KREL"

# --- initramfs: static busybox, the guest scripts, the modules they load ---
R=$WORK/initramfs
mkdir -p "$R"/{bin,sbin,etc/hvx,etc/acpi,proc,sys,dev,run,tmp,data,www,root,var/log,lib/modules/"$KREL"}
cp "$BUSYBOX" "$R/bin/busybox"
install -m 0755 "$GUEST_SRC/init" "$R/init"
install -m 0644 "$GUEST_SRC/inittab" "$R/etc/inittab"
install -m 0644 "$GUEST_SRC/profile" "$R/etc/profile"
install -m 0755 "$GUEST_SRC/rcS" "$GUEST_SRC/rcK" "$GUEST_SRC/udhcpc.script" "$R/etc/hvx/"
install -m 0644 "$GUEST_SRC/modules" "$R/etc/hvx/modules"
cp -r "$GUEST_SRC/acpi/." "$R/etc/acpi/"
echo "root:x:0:0:root:/root:/bin/sh" > "$R/etc/passwd"
echo "root:x:0:" > "$R/etc/group"
for m in $(grep -v '^#' "$GUEST_SRC/modules"); do
  modprobe -d "$WORK/k" -S "$KREL" --show-depends "$m" | awk '$1 == "insmod" {print $2}'
done | sort -u | while read -r ko; do
  rel=${ko#"$WORK/k/"}
  mkdir -p "$R/$(dirname "$rel")"
  cp "$ko" "$R/$rel"
done
cp "$WORK/k/lib/modules/$KREL/"modules.{order,builtin,builtin.modinfo} "$R/lib/modules/$KREL/"
depmod -b "$R" "$KREL"
(cd "$R" && find . | LC_ALL=C sort | cpio -o -H newc --quiet -R 0:0 | gzip -9n) > "$WORK/initrd.gz"
cp "$WORK/k/boot/vmlinuz-$KREL" "$WORK/vmlinuz"

# --- disk: MBR, p1 FAT16 (boot) at 1 MiB, p2 ext4 "hvxdata" ---
SECTOR=512
P1_START=2048
P1_SECTORS=$((40 * 2048))  # 40 MiB
P2_START=$((P1_START + P1_SECTORS))
P2_SECTORS=$((86 * 2048))  # 86 MiB -> 128 MiB disk
DISK_SECTORS=$((P2_START + P2_SECTORS))
DISK=$WORK/disk.raw
truncate -s $((DISK_SECTORS * SECTOR)) "$DISK"

# One MBR partition entry, little-endian (CHS fields are unused by SeaBIOS/Linux here).
le32() { printf '\\x%02x\\x%02x\\x%02x\\x%02x' $(($1 & 255)) $((($1 >> 8) & 255)) $((($1 >> 16) & 255)) $((($1 >> 24) & 255)); }
entry() { # boot-flag type start sectors
  printf "\\x$1\\xfe\\xff\\xff\\x$2\\xfe\\xff\\xff$(le32 "$3")$(le32 "$4")"
}
dd if="$SYSLINUX_MBR" of="$DISK" conv=notrunc status=none
{ entry 80 06 $P1_START $P1_SECTORS; entry 00 83 $P2_START $P2_SECTORS; } |
  dd of="$DISK" bs=1 seek=446 conv=notrunc status=none
printf '\x55\xaa' | dd of="$DISK" bs=1 seek=510 conv=notrunc status=none

mkfs.vfat -F 16 -n HVXBOOT --offset $P1_START "$DISK" $((P1_SECTORS / 2)) >/dev/null
cat > "$WORK/syslinux.cfg" <<'CFG'
SERIAL 0 115200
DEFAULT hvx
PROMPT 0
TIMEOUT 0
LABEL hvx
  KERNEL /vmlinuz
  INITRD /initrd.gz
  APPEND console=tty0 console=ttyS0,115200 loglevel=5 panic=10
CFG
P1="$DISK@@$((P1_START * SECTOR))"
mcopy -i "$P1" "$WORK/vmlinuz" ::/vmlinuz
mcopy -i "$P1" "$WORK/initrd.gz" ::/initrd.gz
mcopy -i "$P1" "$WORK/syslinux.cfg" ::/syslinux.cfg
syslinux --install --offset $((P1_START * SECTOR)) "$DISK"

mkdir -p "$WORK/data"
echo "hvx test guest data filesystem" > "$WORK/data/README"
mkfs.ext4 -q -F -L hvxdata -d "$WORK/data" -E offset=$((P2_START * SECTOR)) "$DISK" $((P2_SECTORS / 2))k

qemu-img convert -f raw -O vmdk -o subformat=streamOptimized "$DISK" "$WORK/disk-stream.vmdk"

# --- publish atomically ---
STAGE=$WORK/out
mkdir -p "$STAGE"
mv "$DISK" "$WORK/disk-stream.vmdk" "$WORK/vmlinuz" "$WORK/initrd.gz" "$STAGE/"
cp "$GUEST_SRC/README.md" "$STAGE/README"
echo "$KPKG $KVER_PKG" > "$STAGE/kernel-version"
touch "$STAGE/.complete"
rm -rf "$OUT"
mv "$STAGE" "$OUT"
log "built in $(($(date +%s) - T0))s"
echo "$OUT"
