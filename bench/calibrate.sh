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
# = SPINS=spins-ns bench/billing.sh seconds-per-slot rounds concurrency 0
set -euo pipefail
SPINS="${4:-3500,7000,14000}" exec "$(dirname "$0")/billing.sh" "${1:-5}" "${2:-3}" "${3:-32}" 0
