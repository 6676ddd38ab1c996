#!/usr/bin/env bash
# Inside the nested guest: a VMM-style step-mode migration of two real mtty devices in one session.
#   guest-step.sh <vfio_step binary>
# Creates four more mtty-2 mdevs (two sources, two destinations; the driver has 24 ports, so 12
# mtty-2 devices at most: 6 in use with the two of guest-test.sh, 10 after guest-control.sh),
# puts bytes into every source UART port,
# runs `vfio_step recv` (the destination VMM) and `vfio_step send` (the source VMM: start with
# pre-copy, status polls until the switchover is ready, vCPU pause, switchover, finish) as two
# processes over loopback, then reads the same bytes back out of the destination devices.
set -uo pipefail
source "$(dirname "$0")/guest-lib.sh"
STEP="$1"
C="$VFMIG_CONTRACT"
TYPE=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
SRC=(83b8f4f2-509f-382f-3c1e-e6bfe0fa1011 83b8f4f2-509f-382f-3c1e-e6bfe0fa1012)
DST=(83b8f4f2-509f-382f-3c1e-e6bfe0fa1021 83b8f4f2-509f-382f-3c1e-e6bfe0fa1022)
PORT=47018
fail() { echo "RESULT vfmig step mode: FAIL ($*)"; exit 1; }

for u in "${SRC[@]}" "${DST[@]}"; do
  echo "$u" >"$TYPE/create" || fail "cannot create mdev $u"
done
dev() { echo "/sys/bus/mdev/devices/$1"; }
# At most 16 bytes per port (mtty's FIFO depth); every port gets its own text.
msg() { echo "step:d$1-port$2"; }
for i in 0 1; do
  for p in 0 1; do "$C" uart-put "$(dev "${SRC[$i]}")" $p "$(msg $i $p)" || fail "uart-put"; done
done

RECV=("$STEP" recv "127.0.0.1:$PORT" "$(dev "${DST[0]}")" "$(dev "${DST[1]}")")
SEND=("$STEP" send "127.0.0.1:$PORT" "$(dev "${SRC[0]}")" "$(dev "${SRC[1]}")")
run_pair vfio_step $PORT
[ $src_rc = 0 ] && [ $dst_rc = 0 ] || fail "send exit $src_rc, recv exit $dst_rc"

for i in 0 1; do
  for p in 0 1; do
    "$C" uart-get "$(dev "${DST[$i]}")" $p "$(msg $i $p)" || fail "destination UART bytes differ"
  done
done
echo "RESULT vfmig step mode: PASS (2 devices, 4 ports read back from the destination)"
