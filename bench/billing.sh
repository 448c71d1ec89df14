#!/usr/bin/env bash
# Requests/s with billing on versus off, non-streamed, through a fake upstream, on SQLite and
# PostgreSQL. Usage: bench/billing.sh [seconds] [concurrency]   (PROFILE=dev for a debug build)
set -euo pipefail
cd "$(dirname "$0")/.."
secs="${1:-10}"
conc="${2:-32}"
profile="${PROFILE:-release}"
if [ "$profile" = "release" ]; then
    cargo build --release --bin tollgate --example billing_bench
    dir=target/release
else
    cargo build --bin tollgate --example billing_bench
    dir=target/debug
fi
tmp=$(mktemp -d)
eval "$(scripts/pg-test.sh start)"
trap 'scripts/pg-test.sh stop "$TOLLGATE_TEST_PG_DIR"; rm -rf "$tmp"' EXIT
echo "== SQLite"
"$dir/examples/billing_bench" --bin "$dir/tollgate" --secs "$secs" --concurrency "$conc" --db "sqlite://$tmp/bench.db"
echo "== PostgreSQL"
"$dir/examples/billing_bench" --bin "$dir/tollgate" --secs "$secs" --concurrency "$conc" --db "$TOLLGATE_TEST_PG_URL"
