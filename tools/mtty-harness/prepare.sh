#!/usr/bin/env bash
# Prepares everything the nested-guest harness needs, cached under $CACHE (default
# <repo>/.cache/mtty-harness, gitignored):
#   host packages (apt), the Debian bookworm 6.12 kernel packages (apt-get download + dpkg-deb -x,
#   nothing installed system-wide), mtty.ko built from the kernel's samples/vfio-mdev/mtty.c,
#   decompressed modules and a busybox initramfs.
# Exit status: 0 ready; 2 environment problem (no root/apt, download failed): the caller skips;
# anything else is a real failure.
set -euo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${VFMIG_HARNESS_CACHE:-$REPO/.cache/mtty-harness}"
mkdir -p "$CACHE"
log() { echo "[prepare] $*"; }
skip() { echo "skipped: $*"; exit 2; }

APT_OPTS=(-o DPkg::Lock::Timeout=300 -o Acquire::Retries=3 -q)
HOST_PKGS=(qemu-system-x86 busybox-static dwarves cpio xz-utils make gcc bc flex bison libelf-dev)

need_install=()
for p in "${HOST_PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || need_install+=("$p")
done
apt_updated=0
apt_update() {
  if [ "$apt_updated" = 0 ]; then
    log "apt-get update"
    apt-get "${APT_OPTS[@]}" update >"$CACHE/apt-update.log" 2>&1 || skip "apt-get update failed (see $CACHE/apt-update.log)"
    apt_updated=1
  fi
}
if [ "${#need_install[@]}" -gt 0 ]; then
  [ "$(id -u)" = 0 ] || skip "not root; cannot install ${need_install[*]}"
  command -v apt-get >/dev/null || skip "no apt-get; cannot install ${need_install[*]}"
  apt_update
  log "apt-get install ${need_install[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get "${APT_OPTS[@]}" install -y --no-install-recommends "${need_install[@]}" \
    >"$CACHE/apt-install.log" 2>&1 || skip "apt-get install ${need_install[*]} failed (see $CACHE/apt-install.log)"
fi
command -v qemu-system-x86_64 >/dev/null || skip "qemu-system-x86_64 not available"

# --- kernel packages -------------------------------------------------------------------------
KDIR="$CACHE/kernel"
if [ ! -f "$KDIR/.done" ]; then
  apt_update
  IMG="$(apt-cache search --names-only '^linux-image-6\.12\.[0-9]+\+deb12-amd64-unsigned$' | awk '{print $1}' | sort -V | tail -1)"
  [ -n "$IMG" ] || skip "no linux-image-6.12.*+deb12-amd64-unsigned in the apt sources (bookworm-security)"
  KV="${IMG#linux-image-}"; KV="${KV%-unsigned}"          # 6.12.NN+deb12-amd64
  KB="${KV%-amd64}"                                       # 6.12.NN+deb12
  PKGS=("$IMG" "linux-headers-$KV" "linux-headers-$KB-common" "linux-kbuild-$KB" "linux-source-6.12")
  rm -rf "$KDIR.tmp"; mkdir -p "$KDIR.tmp/debs" "$KDIR.tmp/root"
  log "apt-get download ${PKGS[*]}"
  (cd "$KDIR.tmp/debs" && apt-get "${APT_OPTS[@]}" download "${PKGS[@]}") >"$CACHE/apt-download.log" 2>&1 \
    || skip "apt-get download failed (see $CACHE/apt-download.log)"
  for d in "$KDIR.tmp"/debs/*.deb; do
    case "$d" in *linux-source*) continue ;; esac
    dpkg-deb -x "$d" "$KDIR.tmp/root"
  done
  # Only mtty.c is needed from the source tarball.
  dpkg-deb --fsys-tarfile "$KDIR.tmp"/debs/linux-source-6.12_*.deb \
    | tar -xO --wildcards './usr/src/linux-source-6.12.tar.xz' \
    | tar -xJ -C "$KDIR.tmp" --wildcards '*/samples/vfio-mdev/mtty.c'
  echo "$KV" >"$KDIR.tmp/version"
  rm -rf "$KDIR.tmp/debs" "$KDIR"; mv "$KDIR.tmp" "$KDIR"; touch "$KDIR/.done"
fi
KV="$(cat "$KDIR/version")"
KB="${KV%-amd64}"
MODDIR="$KDIR/root/lib/modules/$KV"

# --- mtty.ko -------------------------------------------------------------------------------------
MTTY="$CACHE/mtty"
if [ ! -f "$MTTY/mtty.ko" ]; then
  log "building mtty.ko against linux-headers-$KV"
  rm -rf "$MTTY"; mkdir -p "$MTTY"
  cp "$(find "$KDIR" -path '*/samples/vfio-mdev/mtty.c' | head -1)" "$MTTY/mtty.c"
  echo 'obj-m := mtty.o' >"$MTTY/Kbuild"
  HDR="$KDIR/root/usr/src/linux-headers-$KV"
  # The headers' Makefile includes the common headers by their /usr/src path; point it at ours.
  sed -i "s|/usr/src/linux-headers-$KB-common|$KDIR/root/usr/src/linux-headers-$KB-common|g" "$HDR/Makefile"
  # scripts/ and tools are symlinks into /usr/lib/linux-kbuild-*; repoint them too.
  for l in $(find "$HDR" "$KDIR/root/usr/src/linux-headers-$KB-common" -maxdepth 2 -type l); do
    t="$(readlink "$l")"
    case "$t" in /usr/*) ln -sfn "$KDIR/root$t" "$l" ;; esac
  done
  make -C "$HDR" M="$MTTY" modules >"$MTTY/build.log" 2>&1 || { cat "$MTTY/build.log"; echo "mtty.ko build failed"; exit 1; }
fi

# --- initramfs -----------------------------------------------------------------------------------
INITRD="$CACHE/initramfs.cpio.gz"
if [ ! -f "$INITRD" ] || [ "$HERE/guest-init.sh" -nt "$INITRD" ] || [ "$MTTY/mtty.ko" -nt "$INITRD" ]; then
  log "building initramfs"
  IR="$CACHE/initramfs.d"; rm -rf "$IR"; mkdir -p "$IR"/{bin,dev,proc,sys,host,lib/modules}
  cp "$(command -v busybox)" "$IR/bin/busybox"
  [ -f /bin/busybox ] && file /bin/busybox 2>/dev/null | grep -q dynamic && cp /bin/busybox "$IR/bin/busybox" || true
  for m in vfio vfio_iommu_type1 mdev netfs 9pnet 9pnet_virtio 9p; do
    f="$(find "$MODDIR/kernel" -name "$m.ko.xz" -o -name "$m.ko" | head -1)"
    [ -n "$f" ] || { echo "module $m not found under $MODDIR"; exit 1; }
    case "$f" in *.xz) xz -dc "$f" >"$IR/lib/modules/$m.ko" ;; *) cp "$f" "$IR/lib/modules/$m.ko" ;; esac
  done
  cp "$MTTY/mtty.ko" "$IR/lib/modules/mtty.ko"
  cp "$HERE/guest-init.sh" "$IR/init"; chmod +x "$IR/init"
  (cd "$IR" && find . | cpio -o -H newc --quiet | gzip -1) >"$INITRD.tmp"
  mv "$INITRD.tmp" "$INITRD"
fi
ln -sfn "$KDIR/root/boot/vmlinuz-$KV" "$CACHE/vmlinuz"
log "ready: kernel $KV, $(du -sh "$CACHE" | cut -f1) cached in $CACHE"
