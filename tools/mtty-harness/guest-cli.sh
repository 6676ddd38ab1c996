#!/usr/bin/env bash
# Inside the nested guest: migrate a real mtty device with the vfmig CLI over loopback.
#   guest-cli.sh <vfmig binary> <source mdev uuid> <destination mdev uuid>
# Puts bytes into both source UART ports, runs `vfmig recv` and `vfmig send --precopy` with
# vfio: device specs, then reads the same bytes back out of the destination after it resumes.
set -uo pipefail
CLI="$1"; SRC="/sys/bus/mdev/devices/$2"; DST="/sys/bus/mdev/devices/$3"
C="$VFMIG_CONTRACT"
PORT=47017
MSG0="cli:port0-bytes"   # at most 16 bytes: mtty's FIFO depth
MSG1="cli:port1"

"$C" uart-put "$SRC" 0 "$MSG0" && "$C" uart-put "$SRC" 1 "$MSG1" || exit 1

timeout 120 "$CLI" recv --listen "127.0.0.1:$PORT" --device "vfio:$DST" --timeout 30 --json &
rpid=$!
# Wait (bounded) for the listener: port in state LISTEN (0A) in /proc/net/tcp.
hexport=$(printf '%04X' $PORT)
for _ in $(seq 1 100); do
  grep -q ":$hexport 00000000:0000 0A" /proc/net/tcp && break
  sleep 0.1
done
start=$(date +%s%N)
timeout 120 "$CLI" send --connect "127.0.0.1:$PORT" --precopy --device "vfio:$SRC" --timeout 30 --json
src_rc=$?
wait $rpid
dst_rc=$?
echo "vfmig send exit $src_rc, vfmig recv exit $dst_rc, $(( ($(date +%s%N) - start) / 1000000 )) ms"
[ $src_rc = 0 ] && [ $dst_rc = 0 ] || { echo "RESULT vfmig send/recv: FAIL"; exit 1; }

ok=1
"$C" uart-get "$DST" 0 "$MSG0" || ok=0
"$C" uart-get "$DST" 1 "$MSG1" || ok=0
if [ $ok = 1 ]; then echo "RESULT vfmig send/recv: PASS (bytes read back from the destination)"; exit 0; fi
echo "RESULT vfmig send/recv: FAIL (destination UART bytes differ)"; exit 1
