#!/usr/bin/env bash
#! Profiles tollgate's request path with perf: zero-delay fake upstream, closed-loop load, a
#! perf record of the tollgate process only, then the top symbols (flat and by caller).
#
#   bench/profile.sh [stream=0|1] [secs=8] [conns=32]
# Output: bench/results/<run-id>/perf.data, perf-flat.txt, perf-children.txt. Needs `perf`
# (Debian: linux-perf). Loopback only; bounded in time.
. "$(dirname "$0")/lib.sh"
STREAM=${1:-0}
SECS=${2:-8}
CONNS=${3:-32}
command -v perf >/dev/null || die "perf is not installed (apt-get install linux-perf)"
ensure_gwbench
ensure_tollgate
PLACEMENT=${PLACEMENT:-pinned}
mport=$((PORT_BASE + 40))
tport=$((PORT_BASE + 41))
THREADS=1 start mock "$GWBENCH" mock "$HOST:$mport" 0 32 0
mock=$LAST_PID
open_config "$OUT_DIR/tollgate.toml" "$tport" "$mport"
start tollgate "$TOLLGATE" serve --config "$OUT_DIR/tollgate.toml"
tg=$LAST_PID
wait_http "http://$HOST:$tport/healthz" 20 || die "tollgate did not start"
place harness "$mock"
place server "$tg"
gw_load "http://$HOST:$tport/v1/chat/completions" "$CONNS" 2 "$STREAM" >/dev/null
# pass 1: flat profile (no call graphs: cheap, so the load is the real one)
perf record -F 2999 -p "$tg" -o "$OUT_DIR/perf-flat.data" -- sleep "$SECS" 2>"$OUT_DIR/perf-record.log" &
perfpid=$!
sleep 0.3
gw_load "http://$HOST:$tport/v1/chat/completions" "$CONNS" "$SECS" "$STREAM" | tee "$OUT_DIR/load.json"
wait "$perfpid" || true
# pass 2: inclusive (DWARF call graphs; heavier, so fewer samples)
perf record -F 499 --call-graph dwarf,16384 -p "$tg" -o "$OUT_DIR/perf.data" -- sleep "$SECS" 2>>"$OUT_DIR/perf-record.log" &
perfpid=$!
sleep 0.3
gw_load "http://$HOST:$tport/v1/chat/completions" "$CONNS" "$SECS" "$STREAM" >/dev/null
wait "$perfpid" || true
cut_cols() { sed -E 's/[[:space:]]+-[[:space:]]+-[[:space:]]*$//; s/[[:space:]]+$//'; }
perf report -i "$OUT_DIR/perf-flat.data" --no-children --sort dso,symbol --percent-limit 0.4 --stdio 2>/dev/null | cut_cols >"$OUT_DIR/perf-flat.txt"
perf report -i "$OUT_DIR/perf.data" --children --sort symbol --percent-limit 1.5 --stdio -g none 2>/dev/null | cut_cols >"$OUT_DIR/perf-children.txt"
log "flat profile: $OUT_DIR/perf-flat.txt; inclusive: $OUT_DIR/perf-children.txt"
grep -v '^#' "$OUT_DIR/perf-flat.txt" | grep -v '^$' | head -60
