#!/usr/bin/env bash
# Inside the nested guest: vfmig as a separate migration process, driven over its control socket
# by a VMM that keeps its devices (docs/CONTROL.md, issue 14).
#   guest-control.sh <vfmig binary> <vmm_control_client binary>
# Creates four more mtty-2 mdevs (two sources, two destinations: 10 of mtty's 12 mtty-2 devices
# are then in use), starts `vfmig recv --control` and `vfmig send --precopy --control` without
# any --device, and runs tools/examples/vmm_control_client.rs: it opens the four devices itself
# (groups, containers, IOMMU) and keeps them, puts bytes into the source UART ports, hands the fds
# over with SCM_RIGHTS (one device per side as a group fd, one as a device fd), drives the
# migration in steps, resumes the destination devices through its own fds and reads the bytes
# back from them. Prints `RESULT vfmig control socket: PASS|FAIL`.
set -uo pipefail
CLI="$1"; CLIENT="$2"
TYPE=/sys/class/mdev_bus/mtty/mdev_supported_types/mtty-2
SRC=(83b8f4f2-509f-382f-3c1e-e6bfe0fa1031 83b8f4f2-509f-382f-3c1e-e6bfe0fa1032)
DST=(83b8f4f2-509f-382f-3c1e-e6bfe0fa1041 83b8f4f2-509f-382f-3c1e-e6bfe0fa1042)
PORT=47019
fail() { echo "RESULT vfmig control socket: FAIL ($*)"; exit 1; }

[ -x "$CLI" ] || fail "vfmig binary not built: '$CLI'"
[ -x "$CLIENT" ] || fail "vmm_control_client not built: '$CLIENT'"
for u in "${SRC[@]}" "${DST[@]}"; do
  echo "$u" >"$TYPE/create" || fail "cannot create mdev $u"
done
DIR=$(mktemp -d) || fail "mktemp"
dev() { echo "/sys/bus/mdev/devices/$1"; }

start=$(date +%s%N)
timeout 120 "$CLI" recv --listen "127.0.0.1:$PORT" --control "unix:$DIR/dst.sock" --timeout 30 &
rpid=$!
timeout 120 "$CLI" send --connect "127.0.0.1:$PORT" --precopy --control "unix:$DIR/src.sock" \
  --timeout 30 &
spid=$!
timeout 120 "$CLIENT" "$DIR/src.sock" "$DIR/dst.sock" \
  "$(dev "${SRC[0]}")" "$(dev "${SRC[1]}")" "$(dev "${DST[0]}")" "$(dev "${DST[1]}")"
crc=$?
if [ $crc != 0 ]; then
  # A client that failed before connecting leaves vfmig waiting for one: end them now.
  kill "$spid" "$rpid" 2>/dev/null
fi
wait $spid; src_rc=$?
wait $rpid; dst_rc=$?
echo "control client exit $crc, vfmig send exit $src_rc, recv exit $dst_rc," \
  "$(( ($(date +%s%N) - start) / 1000000 )) ms"
[ $crc = 0 ] || fail "client exit $crc"
[ $src_rc = 0 ] && [ $dst_rc = 0 ] || fail "vfmig send exit $src_rc, recv exit $dst_rc"
echo "RESULT vfmig control socket: PASS (2 devices held by the client, 4 ports read back by it)"
