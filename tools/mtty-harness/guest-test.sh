#!/usr/bin/env bash
# Runs inside the nested guest, chrooted into the host root (read-only 9p). Creates two mtty mdevs
# and runs the device checks and, when the CLI is built, a vfmig send/recv migration between them;
# then guest-step.sh migrates two more mtty devices in one session with the step API, and
# guest-control.sh two more through vfmig's control socket, the devices held by a client process.
# Exit status 0 = everything passed. Environment (from the kernel command line):
#   VFMIG_CONTRACT  path of the contract_vfio example binary
#   VFMIG_CLI       path of the vfmig binary (optional; empty = CLI step skipped)
#   VFMIG_STEP      path of the vfio_step example binary (required)
#   VFMIG_CONTROL_CLIENT  path of the vmm_control_client example binary (required, with VFMIG_CLI)
set -uo pipefail
SRC_UUID=83b8f4f2-509f-382f-3c1e-e6bfe0fa1001
DST_UUID=83b8f4f2-509f-382f-3c1e-e6bfe0fa1002
TYPE=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
fail=0

echo "== guest: creating two mtty-2 mdevs"
for u in $SRC_UUID $DST_UUID; do
  echo "$u" >"$TYPE/create" || { echo "cannot create mdev $u"; exit 1; }
  echo "mdev $u: iommu_group $(basename "$(readlink /sys/bus/mdev/devices/$u/iommu_group)")"
done
ls -l /dev/vfio/

echo "== guest: device contract (vfio/examples/contract_vfio.rs)"
start=$(date +%s%N)
"$VFMIG_CONTRACT" /sys/bus/mdev/devices/$SRC_UUID /sys/bus/mdev/devices/$DST_UUID || fail=1
echo "contract_vfio took $(( ($(date +%s%N) - start) / 1000000 )) ms"

if [ -n "${VFMIG_CLI:-}" ] && [ -x "$VFMIG_CLI" ]; then
  echo "== guest: vfmig send/recv over loopback with vfio: devices"
  bash "$(dirname "$0")/guest-cli.sh" "$VFMIG_CLI" $SRC_UUID $DST_UUID || fail=1
else
  echo "== guest: vfmig CLI step skipped (binary not built)"
fi

echo "== guest: step mode, two devices in one session (pipeline/examples/vfio_step.rs)"
if [ -n "${VFMIG_STEP:-}" ] && [ -x "$VFMIG_STEP" ]; then
  bash "$(dirname "$0")/guest-step.sh" "$VFMIG_STEP" || fail=1
else
  echo "RESULT vfmig step mode: FAIL (VFMIG_STEP not set or not executable: '${VFMIG_STEP:-}')"
  fail=1
fi

echo "== guest: vfmig --control, the devices held by a VMM process (tools/examples/vmm_control_client.rs)"
bash "$(dirname "$0")/guest-control.sh" "${VFMIG_CLI:-}" "${VFMIG_CONTROL_CLIENT:-}" || fail=1
exit $fail
