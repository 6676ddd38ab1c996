#!/bin/busybox sh
# /init of the harness initramfs (busybox). Loads VFIO, mdev, mtty and 9p, mounts the host root
# (shared read-only over 9p) at /host, chroots into it and runs the guest test script named on the
# kernel command line (VFMIG_GUEST_SCRIPT=...). Prints the result marker, then powers off.
/bin/busybox --install -s /bin
export PATH=/bin:/sbin:/usr/bin:/usr/sbin
mkdir -p /proc /sys /dev /host /tmp
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
marker() { echo "VFMIG-MTTY-HARNESS: $*"; sync; poweroff -f; sleep 5; }
for m in vfio vfio_iommu_type1 mdev mtty netfs 9pnet 9pnet_virtio 9p; do
  insmod /lib/modules/$m.ko || marker "FAIL (insmod $m)"
done
mount -t 9p -o trans=virtio,version=9p2000.L,ro,msize=262144 hostfs /host || marker "FAIL (mount 9p hostfs)"
mount --bind /dev /host/dev
mount --bind /proc /host/proc
mount --bind /sys /host/sys
# Writable scratch space: /dev/shm always (TMPDIR); a tmpfs over /tmp only when nothing we run
# lives under the host's /tmp (a checkout or target dir there must stay visible).
mkdir -p /dev/shm && mount -t tmpfs tmpfs /dev/shm
export TMPDIR=/dev/shm
case "$VFMIG_GUEST_SCRIPT $VFMIG_CONTRACT $VFMIG_CLI" in
  */tmp/*) ;;
  *) mount -t tmpfs tmpfs /host/tmp ;;
esac
ip link set lo up 2>/dev/null || ifconfig lo 127.0.0.1 up
echo "guest: kernel $(uname -r), running $VFMIG_GUEST_SCRIPT"
chroot /host /bin/bash "$VFMIG_GUEST_SCRIPT"
rc=$?
if [ "$rc" = 0 ]; then marker "PASS"; else marker "FAIL (guest script exit $rc)"; fi
