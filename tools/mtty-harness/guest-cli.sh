#!/usr/bin/env bash
# Inside the nested guest: migrate a real mtty device with the vfmig CLI over loopback.
#   guest-cli.sh <vfmig binary> <source mdev uuid> <destination mdev uuid>
# Puts bytes into both source UART ports, runs `vfmig recv` and `vfmig send --precopy` with
# vfio: device specs, then reads the same bytes back out of the destination after it resumes.
set -uo pipefail
source "$(dirname "$0")/guest-lib.sh"
CLI="$1"; SRC="/sys/bus/mdev/devices/$2"; DST="/sys/bus/mdev/devices/$3"
C="$VFMIG_CONTRACT"
PORT=47017
MSG0="cli:port0-bytes"   # at most 16 bytes: mtty's FIFO depth
MSG1="cli:port1"

"$C" uart-put "$SRC" 0 "$MSG0" && "$C" uart-put "$SRC" 1 "$MSG1" || exit 1

RECV=("$CLI" recv --listen "127.0.0.1:$PORT" --device "vfio:$DST" --timeout 30 --json)
SEND=("$CLI" send --connect "127.0.0.1:$PORT" --precopy --device "vfio:$SRC" --timeout 30 --json)
run_pair vfmig $PORT
[ $src_rc = 0 ] && [ $dst_rc = 0 ] || { echo "RESULT vfmig send/recv: FAIL"; exit 1; }

ok=1
"$C" uart-get "$DST" 0 "$MSG0" || ok=0
"$C" uart-get "$DST" 1 "$MSG1" || ok=0
if [ $ok = 1 ]; then echo "RESULT vfmig send/recv: PASS (bytes read back from the destination)"; exit 0; fi
echo "RESULT vfmig send/recv: FAIL (destination UART bytes differ)"; exit 1
