#!/usr/bin/env bash
# tools/netns.sh: two network namespaces joined by a rate-limited veth pair, for vfmig benchmarks.
#
#   tools/netns.sh up RATE        create (or re-create) the link; RATE as tc spells it: 1gbit, 2500mbit,
#                                 2.5gbit, 10gbit. Both directions are limited with `tc qdisc tbf`.
#   tools/netns.sh down           tear everything down; idempotent (fine to run when nothing is up).
#   tools/netns.sh exec SIDE CMD  run CMD inside SIDE's namespace; SIDE is `src` or `dst`.
#   tools/netns.sh addr SIDE      print SIDE's address (for --connect / --listen).
#   tools/netns.sh status         show namespaces, addresses and qdiscs.
#
# Addresses come from 198.18.0.0/15 (RFC 2544, reserved for benchmarking) and exist only inside the
# two namespaces this script creates. Neither namespace gets a default route or any other interface
# than `lo` and its veth end, so traffic cannot leave them.
#
# Needs root (CAP_NET_ADMIN + CAP_SYS_ADMIN). Without it, prints why and exits 77 (the automake
# "skipped" code); callers treat 77 as "skip this scenario", not as a failure.
set -euo pipefail

readonly NS_SRC=vfmig-src
readonly NS_DST=vfmig-dst
readonly IF_SRC=vfmig-veth-s
readonly IF_DST=vfmig-veth-d
readonly ADDR_SRC=198.18.0.1
readonly ADDR_DST=198.18.0.2
readonly PREFIX=30
readonly EXIT_SKIP=77

die() { echo "netns.sh: $*" >&2; exit 1; }
skip() { echo "netns.sh: SKIP: $*" >&2; exit "$EXIT_SKIP"; }

usage() {
    sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
}

need_root() {
    [ "$(id -u)" -eq 0 ] || skip "needs root (network namespaces and tc)"
    command -v ip >/dev/null 2>&1 || skip "iproute2 'ip' not found"
    command -v tc >/dev/null 2>&1 || skip "'tc' not found"
}

ns_of() {
    case "$1" in
        src) echo "$NS_SRC" ;;
        dst) echo "$NS_DST" ;;
        *) die "SIDE must be src or dst, not '$1'" ;;
    esac
}

ns_exists() { ip netns list 2>/dev/null | awk '{print $1}' | grep -qx "$1"; }

# RATE -> bytes per second, to size the tbf bucket. Accepts what tc accepts for bit rates we use.
rate_bytes() {
    local r=$1 num unit mult
    num=$(echo "$r" | sed -E 's/^([0-9]+(\.[0-9]+)?)([a-zA-Z]*)$/\1/')
    unit=$(echo "$r" | sed -E 's/^([0-9]+(\.[0-9]+)?)([a-zA-Z]*)$/\3/' | tr 'A-Z' 'a-z')
    [ -n "$num" ] && [ "$num" != "$r" ] || [ -z "$unit" ] || die "bad RATE '$r'"
    case "$unit" in
        gbit) mult=1000000000 ;;
        mbit) mult=1000000 ;;
        kbit) mult=1000 ;;
        bit | "") mult=1 ;;
        *) die "bad RATE unit in '$r' (use gbit, mbit or kbit)" ;;
    esac
    awk -v n="$num" -v m="$mult" 'BEGIN { printf "%d", n * m / 8 }'
}

down() {
    need_root
    # Deleting a namespace deletes the veth end inside it, and with it the peer.
    for ns in "$NS_SRC" "$NS_DST"; do
        if ns_exists "$ns"; then ip netns del "$ns"; fi
    done
}

up() {
    local rate=${1:-}
    [ -n "$rate" ] || usage
    need_root
    local bps burst
    bps=$(rate_bytes "$rate")
    [ "$bps" -gt 0 ] || die "RATE '$rate' is zero"
    # Bucket: 4 ms worth of the rate, at least 256 KiB so a 64 KiB GSO segment always fits.
    burst=$((bps / 250))
    [ "$burst" -ge 262144 ] || burst=262144

    down
    ip netns add "$NS_SRC" 2>/dev/null || skip "cannot create network namespaces here"
    ip netns add "$NS_DST"
    ip link add "$IF_SRC" netns "$NS_SRC" type veth peer name "$IF_DST" netns "$NS_DST"
    ip -n "$NS_SRC" addr add "$ADDR_SRC/$PREFIX" dev "$IF_SRC"
    ip -n "$NS_DST" addr add "$ADDR_DST/$PREFIX" dev "$IF_DST"
    for side in src dst; do
        local ns ifc
        ns=$(ns_of "$side")
        if [ "$side" = src ]; then ifc=$IF_SRC; else ifc=$IF_DST; fi
        ip -n "$ns" link set lo up
        ip -n "$ns" link set "$ifc" up
        ip netns exec "$ns" tc qdisc replace dev "$ifc" root tbf rate "$rate" burst "$burst" latency 20ms
    done
    # Sanity: the only routes are the connected /30 (and loopback); no default route exists.
    if ip -n "$NS_SRC" route show default | grep -q .; then die "unexpected default route in $NS_SRC"; fi
    echo "netns.sh: up: $NS_SRC ($ADDR_SRC) <-> $NS_DST ($ADDR_DST), tbf $rate, burst $burst bytes"
}

status() {
    need_root
    for side in src dst; do
        local ns
        ns=$(ns_of "$side")
        if ns_exists "$ns"; then
            echo "== $side ($ns)"
            ip -n "$ns" -br addr
            ip netns exec "$ns" tc qdisc show
        else
            echo "== $side ($ns): not up"
        fi
    done
}

cmd=${1:-}
[ -n "$cmd" ] || usage
shift
case "$cmd" in
    up) up "$@" ;;
    down) down ;;
    status) status ;;
    addr)
        [ $# -eq 1 ] || usage
        case "$1" in src) echo "$ADDR_SRC" ;; dst) echo "$ADDR_DST" ;; *) die "SIDE must be src or dst" ;; esac
        ;;
    exec)
        [ $# -ge 2 ] || usage
        need_root
        ns=$(ns_of "$1")
        shift
        ns_exists "$ns" || die "$ns is not up; run: $0 up RATE"
        exec ip netns exec "$ns" "$@"
        ;;
    *) usage ;;
esac
