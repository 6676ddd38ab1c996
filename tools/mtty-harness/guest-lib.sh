# Sourced by the guest scripts (guest-cli.sh, guest-step.sh).

# run_pair <label> <port>: runs the destination command "${RECV[@]}" in the background, waits
# (bounded) until it listens on 127.0.0.1:<port>, runs the source command "${SEND[@]}", then
# waits for both (each bounded by `timeout 120`). Sets src_rc and dst_rc.
run_pair() {
  local label="$1" port="$2" hexport start rpid
  timeout 120 "${RECV[@]}" &
  rpid=$!
  # The listener is up once the port is in state LISTEN (0A) in /proc/net/tcp.
  hexport=$(printf '%04X' "$port")
  for _ in $(seq 1 100); do
    grep -q ":$hexport 00000000:0000 0A" /proc/net/tcp && break
    sleep 0.1
  done
  start=$(date +%s%N)
  timeout 120 "${SEND[@]}"
  src_rc=$?
  wait $rpid
  dst_rc=$?
  echo "$label send exit $src_rc, recv exit $dst_rc, $(( ($(date +%s%N) - start) / 1000000 )) ms"
}
