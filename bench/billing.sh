#!/usr/bin/env bash
# Requests/s with billing on versus off, non-streamed, through a fake upstream, on SQLite and
# PostgreSQL, from ONE release binary. Five gateways run side by side (billing off; on over a
# SQLite file; on over a throwaway PostgreSQL from scripts/pg-test.sh, as the tests use; and the
# same two with `[billing] admission = "lease"`) and are measured in turn, round after round;
# prints a table of medians and the cost of billing.
#
#   bench/billing.sh [seconds-per-slot] [rounds] [concurrency] [upstream-delay-ms]  # defaults: 5 3 32 0
#   PROFILE=dev bench/billing.sh ...                                # a debug build instead
#   SPINS=3500,7000 bench/billing.sh ...   # calibration instead of billing (bench/calibrate.sh):
#       billing off beside copies that spin that many ns per request (release build with the
#       `calibration` feature, in target/calibration); no database
#   PLACEMENT=isolated bench/billing.sh ...   # performance.md §6.3 "Run A": the gateways and
#       PostgreSQL pinned to CPU 1, the load generator and fake upstream to CPU 0 (default
#       "shared": everything unpinned, "Run B")
# Wrapped in `flock /work/notes/bench.lock` when /work/notes exists (shared machine).
set -euo pipefail
cd "$(dirname "$0")/.."
for v in $(scripts/ggml-cpu-flags.sh); do export "${v?}"; done # llama.cpp build options as `make` sets them
secs="${1:-5}"
rounds="${2:-3}"
conc="${3:-32}"
delay="${4:-0}"
spins="${SPINS:-}"
profile="${PROFILE:-release}"
if [ -n "$spins" ]; then
    profile=calibration
    cargo build --release --features calibration --target-dir target/calibration --bin tollgate --example billing_bench
    dir=target/calibration/release
elif [ "$profile" = "release" ]; then
    cargo build --release --bin tollgate --example billing_bench
    dir=target/release
else
    cargo build --bin tollgate --example billing_bench
    dir=target/debug
fi
tmp=$(mktemp -d)
placement="${PLACEMENT:-shared}"
gw="$dir/tollgate"
load=()
pin=()
case "$placement" in
    shared) ;;
    isolated)
        pin=(taskset -c 1)
        gw="$tmp/gateway"
        printf '#!/bin/sh\nexec taskset -c 1 %s "$@"\n' "$(readlink -f "$dir/tollgate")" >"$gw"
        chmod +x "$gw"
        load=(taskset -c 0)
        ;;
    *) echo "PLACEMENT must be shared or isolated" >&2; exit 2 ;;
esac
if [ -n "$spins" ]; then
    trap 'rm -rf "$tmp"' EXIT
    modes=(--burn-ns "$spins")
else
    pg=$("${pin[@]}" scripts/pg-test.sh start) # a failed start stops here (set -e)
    eval "$pg"
    trap 'scripts/pg-test.sh stop "$TOLLGATE_TEST_PG_DIR"; rm -rf "$tmp"' EXIT
    modes=(--sqlite "sqlite://$tmp/bench.db" --pg "$TOLLGATE_TEST_PG_URL"
        --lease-sqlite "sqlite://$tmp/lease.db" --lease-pg "$TOLLGATE_TEST_PG_URL")
fi
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), profile $profile, placement $placement, $(nproc) CPUs, $(date -u +%FT%TZ)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
lock=()
if [ -d /work/notes ]; then lock=(flock /work/notes/bench.lock); fi
"${lock[@]}" "${load[@]}" "$dir/examples/billing_bench" --bin "$gw" --secs "$secs" --rounds "$rounds" \
    --concurrency "$conc" --delay-ms "$delay" "${modes[@]}"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
