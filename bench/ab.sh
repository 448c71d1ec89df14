#!/usr/bin/env bash
# Side by side at one connection: two tollgate binaries A and B, the bench-floor proxy and the fake
# upstream all up at once, measured in interleaved rounds (direct, floor, A, B), so a change to the
# request path is judged against the same machine state rather than against another run's numbers.
#
#   A=/tmp/tollgate-before B=target/release/tollgate bench/ab.sh
#   knobs: PLACEMENT=unpinned-cfs (default; see lib.sh) ROUNDS=6 SECS=3 CONNS=1 PORT_BASE=19100
# Prints one line per round: "NAME=p50_ms req/s" for each target. Open mode (no key, no billing),
# zero-delay upstream, non-streamed; loopback only, bounded in time.
PLACEMENT=${PLACEMENT:-unpinned-cfs} # before lib.sh, whose default is pinned
. "$(dirname "$0")/lib.sh"
A=${A:?set A to the first tollgate binary}
B=${B:?set B to the second tollgate binary}
ROUNDS=${ROUNDS:-6}
SECS=${SECS:-3}
CONNS=${CONNS:-1}
ensure_gwbench
mport=$((PORT_BASE + 60))
fport=$((PORT_BASE + 61))
aport=$((PORT_BASE + 62))
bport=$((PORT_BASE + 63))
THREADS=1 start mock "$GWBENCH" mock "$HOST:$mport" 0 32 0
mock=$LAST_PID
THREADS=2 start floor "$GWBENCH" proxy "$HOST:$fport" "http://$HOST:$mport/v1/chat/completions"
floor=$LAST_PID
open_config "$OUT_DIR/a.toml" "$aport" "$mport"
open_config "$OUT_DIR/b.toml" "$bport" "$mport"
start a "$A" serve --config "$OUT_DIR/a.toml"
pa=$LAST_PID
start b "$B" serve --config "$OUT_DIR/b.toml"
pb=$LAST_PID
wait_http "http://$HOST:$aport/healthz" 20 || die "A did not start"
wait_http "http://$HOST:$bport/healthz" 20 || die "B did not start"
place harness "$mock"
for p in "$floor" "$pa" "$pb"; do place server "$p"; done
targets="direct:$mport floor:$fport a:$aport b:$bport"
for t in $targets; do # warm-up
    gw_load "http://$HOST:${t#*:}/v1/chat/completions" "$CONNS" 1 0 >/dev/null
done
for r in $(seq 1 "$ROUNDS"); do
    line="round $r:"
    for t in $targets; do
        v=$(gw_load "http://$HOST:${t#*:}/v1/chat/completions" "$CONNS" "$SECS" 0 |
            python3 -c 'import json,sys; d=json.load(sys.stdin); print(d["p50_ms"], d["rps"])')
        line="$line ${t%%:*}=$v"
    done
    echo "$line"
done
