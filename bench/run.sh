#!/usr/bin/env bash
#! Entry point for tollgate's benchmarks: runs one named bench (default: gateway) and prints its table.
#
#   bench/run.sh [BENCH] [--quick]
#
# BENCH is a script bench/BENCH.sh that sources bench/lib.sh and appends JSON lines to
# bench/results/<run-id>/results.jsonl (gitignored). Available:
#   gateway   what tollgate adds vs direct / the bench-floor proxy / LiteLLM (issue 2)
# Environment knobs are listed at the top of each bench script; the common ones live in lib.sh:
#   PLACEMENT=pinned|unpinned   PORT_BASE=19100   BUILD=0   QUICK=1   PGO=0 (gateway: plain release build)
# Loopback only. Every load step is bounded in time; a full gateway run takes ~12 minutes.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
bench=gateway
for a in "$@"; do
    case $a in
    --quick) export QUICK=1 ;;
    -h | --help) sed -n '2,12p' "$0" | sed 's/^#!\? \?//'; exit 0 ;;
    *) bench=$a ;;
    esac
done
[ -f "$here/$bench.sh" ] || { echo "no bench named '$bench' (bench/$bench.sh)" >&2; exit 2; }
exec bash "$here/$bench.sh"
