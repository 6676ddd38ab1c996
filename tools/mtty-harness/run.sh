#!/usr/bin/env bash
# The nested-guest harness (issue 7): boots a Debian 6.12 kernel under QEMU (TCG) with the mtty
# sample mdev driver and runs vfmig against two real VFIO migration devices.
#
#   tools/mtty-harness/run.sh
#
# Exit status: 0 pass; 1 a real failure (device, vfmig, guest); 77 skipped because the machine
# cannot run it (no root/apt, download failed, no QEMU), with a line "skipped: <reason>".
# Cache: <repo>/.cache/mtty-harness (gitignored); set VFMIG_HARNESS_CACHE to move it.
# VFMIG_GUEST_SCRIPT=<absolute path> runs your own script in the guest instead of guest-test.sh
# (same environment: VFMIG_CONTRACT, VFMIG_CLI, VFMIG_STEP, VFMIG_CONTROL_CLIENT; exit 0 = pass).
set -uo pipefail
HERE="$(cd "$(dirname "$0")" && pwd)"
REPO="$(cd "$HERE/../.." && pwd)"
CACHE="${VFMIG_HARNESS_CACHE:-$REPO/.cache/mtty-harness}"
export VFMIG_HARNESS_CACHE="$CACHE"
T0=$(date +%s)
elapsed() { echo "$(( $(date +%s) - T0 ))s"; }

echo "== mtty harness: prepare (kernel, mtty.ko, initramfs)"
"$HERE/prepare.sh"
rc=$?
if [ $rc = 2 ]; then exit 77; fi
if [ $rc != 0 ]; then echo "VFMIG-MTTY-HARNESS: FAIL (prepare, exit $rc)"; exit 1; fi
echo "prepared after $(elapsed)"

echo "== mtty harness: building the guest programs"
TARGET="$(cd "$REPO" && cargo metadata --format-version 1 --no-deps 2>/dev/null \
  | sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')"
[ -n "$TARGET" ] || TARGET="${CARGO_TARGET_DIR:-$REPO/target}"
(cd "$REPO" && cargo build --release -q -p vfmig-vfio --example contract_vfio) \
  || { echo "VFMIG-MTTY-HARNESS: FAIL (building contract_vfio)"; exit 1; }
CONTRACT="$TARGET/release/examples/contract_vfio"
(cd "$REPO" && cargo build --release -q -p vfmig-pipeline --example vfio_step) \
  || { echo "VFMIG-MTTY-HARNESS: FAIL (building vfio_step)"; exit 1; }
STEP="$TARGET/release/examples/vfio_step"
(cd "$REPO" && cargo build --release -q -p vfmig --example vmm_control_client) \
  || { echo "VFMIG-MTTY-HARNESS: FAIL (building vmm_control_client)"; exit 1; }
CONTROL_CLIENT="$TARGET/release/examples/vmm_control_client"
CLI=""
# The CLI step runs once `vfmig send` and `vfmig recv` exist (tools/, issue 5).
if (cd "$REPO" && cargo build --release -q -p vfmig --bin vfmig) >"$CACHE/cli-build.log" 2>&1 \
   && "$TARGET/release/vfmig" send --help >/dev/null 2>&1 \
   && "$TARGET/release/vfmig" recv --help >/dev/null 2>&1; then
  CLI="$TARGET/release/vfmig"
else
  echo "vfmig send/recv not available (see $CACHE/cli-build.log): the CLI step will be skipped"
fi
echo "built after $(elapsed): $CONTRACT $STEP $CONTROL_CLIENT ${CLI:+and $CLI}"

echo "== mtty harness: booting the guest (qemu-system-x86_64 -accel tcg -cpu max)"
LOG="$CACHE/guest-console.log"
SCRIPT="${VFMIG_GUEST_SCRIPT:-$HERE/guest-test.sh}"
timeout --foreground 300 qemu-system-x86_64 -accel tcg -cpu max -smp 2 -m 1024 \
  -kernel "$CACHE/vmlinuz" -initrd "$CACHE/initramfs.cpio.gz" \
  -append "console=ttyS0 quiet loglevel=3 panic=-1 VFMIG_GUEST_SCRIPT=$SCRIPT VFMIG_CONTRACT=$CONTRACT VFMIG_CLI=$CLI VFMIG_STEP=$STEP VFMIG_CONTROL_CLIENT=$CONTROL_CLIENT" \
  -virtfs local,path=/,mount_tag=hostfs,security_model=none,readonly=on,multidevs=remap \
  -display none -serial stdio -monitor none -no-reboot -nodefaults \
  </dev/null 2>&1 | tee "$LOG"
qrc=${PIPESTATUS[0]}
echo "guest finished after $(elapsed) (qemu exit $qrc)"
count() { grep -ac "$1" "$LOG" || true; }
step_result=$(grep -ao '^RESULT vfmig step mode: [A-Z]*' "$LOG" | sed 's/.*: //')
control_result=$(grep -ao '^RESULT vfmig control socket: [A-Z]*' "$LOG" | sed 's/.*: //')
echo "summary: contract suite SET $(count '^SUITE ARC') distinct arcs; the tour SET $(count '^ARC .*: ok') arcs;" \
  "$(count '^URING ') io_uring ops on real data fds; $(count '^BYTES read back') UART read-backs;" \
  "$(count '^QUIRK ') quirk notes; $(count '^CHECK .*FAILED') failed checks;" \
  "step mode ${step_result:-missing}" \
  "($(count '^STEP .*after the switchover') devices switched over);" \
  "control socket ${control_result:-missing}" \
  "($(count '^CTRL bytes read back from destination') ports read back by the client holding the devices)"
# The default guest script must also have migrated two devices in step mode and two through the
# control socket (a custom VFMIG_GUEST_SCRIPT decides for itself).
step_ok=1
missing=""
if [ -z "${VFMIG_GUEST_SCRIPT:-}" ]; then
  [ "$step_result" = PASS ] || missing="'RESULT vfmig step mode: PASS'"
  [ "$control_result" = PASS ] || missing="${missing:+$missing and }'RESULT vfmig control socket: PASS'"
  [ -z "$missing" ] || step_ok=0
fi
if grep -q '^VFMIG-MTTY-HARNESS: PASS' "$LOG" && [ $step_ok = 1 ]; then
  echo "mtty harness: PASS in $(elapsed)"
  exit 0
fi
if [ "$qrc" = 124 ]; then echo "mtty harness: FAIL (guest timed out)"; exit 1; fi
if [ $step_ok = 0 ] && grep -q '^VFMIG-MTTY-HARNESS: PASS' "$LOG"; then
  echo "mtty harness: FAIL (the guest passed without $missing)"; exit 1
fi
echo "mtty harness: FAIL ($(grep -a '^VFMIG-MTTY-HARNESS:' "$LOG" || echo 'no result marker from the guest'))"
exit 1
