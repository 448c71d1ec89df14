#!/usr/bin/env bash
# What a known amount of added per-request work costs in throughput on this machine, measured
# as bench/billing.sh measures billing (non-streamed, zero-delay fake upstream, closed loop,
# everything on the same cores): the billing-off gateway beside copies of itself that spin a
# fixed time in every request (a release build with the `calibration` feature, in its own target
# directory: ~12 min the first time). Prints the same table as bench/billing.sh; read "cost" of
# a row "off + X µs spin" as what X µs of added work per request costs in throughput here, and
# its CPU µs/request against billing off's as what it costs in the gateway's CPU.
#
#   bench/calibrate.sh [seconds-per-slot] [rounds] [concurrency] [spins-ns]
#   # defaults: 5 3 32 3500,7000,14000
# Wrapped in `flock /work/notes/bench.lock` when /work/notes exists (shared machine).
set -euo pipefail
cd "$(dirname "$0")/.."
for v in $(scripts/ggml-cpu-flags.sh); do export "${v?}"; done # llama.cpp build options as `make` sets them
secs="${1:-5}"
rounds="${2:-3}"
conc="${3:-32}"
spins="${4:-3500,7000,14000}"
cargo build --release --features calibration --target-dir target/calibration --bin tollgate --example billing_bench
dir=target/calibration/release
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), calibration build, $(nproc) CPUs, $(date -u +%FT%TZ)"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
lock=()
if [ -d /work/notes ]; then lock=(flock /work/notes/bench.lock); fi
"${lock[@]}" "$dir/examples/billing_bench" --bin "$dir/tollgate" --secs "$secs" --rounds "$rounds" \
    --concurrency "$conc" --burn-ns "$spins"
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
