#!/usr/bin/env bash
# Added latency of the rate-limit check, at a fixed 1,000 req/s (open loop, oha -q), through a
# loopback fake upstream (bench-floor's `gwbench mock`, zero delay):
#   none    a key without a plan (the limiter is skipped)           -> baseline
#   memory  a key whose plan sets rpm, tpm, max_concurrent, rpd, tpd and spend caps, in process
#   redis   the same plan, every check one Lua EVALSHA on a local redis-server
# Limits are far above the offered load, so every request is admitted and the difference to the
# baseline is the cost of the check and its settlement. Billing (SQLite) is on in all three cases
# (keys are database keys), so its cost is in the baseline too.
#
#   bench/limits.sh                 # RATE=1000 SECS=20 CONNS=32
# Prints one line per case (p50/p90/p99 in ms, achieved req/s, non-200 count) and writes them to
# bench/results/limits-<time>.txt. Tools: oha (.tools/bin/oha or $OHA; `cargo install oha` once),
# gwbench ($GWBENCH, or built from /work/shared/bench-floor), redis-server (Debian package).
# Everything runs on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
RATE=${RATE:-1000}
SECS=${SECS:-20}
CONNS=${CONNS:-32}
TOOLS=${TOOLS:-$ROOT/.tools}
OHA=${OHA:-$TOOLS/bin/oha}
GWBENCH=${GWBENCH:-$TOOLS/gwbench-target/release/gwbench}
FLOOR_SRC=${FLOOR_SRC:-/work/shared/bench-floor}
TOLLGATE=${TOLLGATE:-$ROOT/target/release/tollgate}
OUT=$ROOT/bench/results
mkdir -p "$OUT"
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
REPORT=$OUT/limits-$STAMP.txt
WORK=$(mktemp -d)
PIDS=()

cleanup() {
    for p in "${PIDS[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$WORK"
}
trap cleanup EXIT

log() { printf '[limits-bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
wait_port() { for _ in $(seq 1 200); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

if [ ! -x "$OHA" ]; then
    log "installing oha into $TOOLS (once)"
    cargo install oha --locked --quiet --root "$TOOLS"
fi
if [ ! -x "$GWBENCH" ]; then
    log "building gwbench from $FLOOR_SRC"
    cargo build --release --quiet --manifest-path "$FLOOR_SRC/Cargo.toml" --target-dir "$TOOLS/gwbench-target"
fi
if [ "${BUILD:-1}" = 1 ]; then
    log "cargo build --release"
    (cd "$ROOT" && cargo build --release --quiet --bin tollgate)
fi
command -v redis-server >/dev/null || { log "redis-server missing (apt-get install redis-server)"; exit 1; }

UP_PORT=$(free_port)
THREADS=1 "$GWBENCH" mock "127.0.0.1:$UP_PORT" 0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
REDIS_PORT=$(free_port)
redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT"
wait_port "$REDIS_PORT"

cat >"$WORK/tollgate.toml" <<EOF
[server]
listen = "127.0.0.1:0"
metrics = false
[auth]
required = true
[database]
url = "sqlite://$WORK/tollgate.db"
[[providers]]
name = "mock"
dialect = "openai"
base_url = "http://127.0.0.1:$UP_PORT/v1"
[[models]]
id = "m"
max_output_tokens = 64
  [[models.routes]]
  provider = "mock"
  upstream_model = "gpt-4o-mini"
  price_per_mtok = { input = 1.0, output = 2.0 }
[[plans]]
name = "big"
requests_per_minute = 100000000
tokens_per_minute = 1000000000
max_concurrent = 100000
requests_per_day = 1000000000
tokens_per_day = 1000000000
spend_cap_daily_usd = 1000000.0
spend_cap_monthly_usd = 1000000.0
EOF
export TOLLGATE_SECRET=limits-bench-secret-0123456789abcdef
tg() { "$TOLLGATE" --config "$WORK/tollgate.toml" "$@"; }
tg accounts create none >/dev/null
tg accounts create limited --plan big >/dev/null
for a in none limited; do tg credits add "$a" 1000000 --reason bench >/dev/null; done
KEY_NONE=$(tg keys create --account none)
KEY_LIMITED=$(tg keys create --account limited)
BODY='{"model":"m","messages":[{"role":"user","content":"Say something short."}],"max_tokens":32}'

# run NAME KEY [ARGS...]: start tollgate with ARGS, warm up, measure at RATE for SECS.
run() {
    local name=$1 key=$2; shift 2
    local port; port=$(free_port)
    RUST_LOG=warn "$TOLLGATE" --config "$WORK/tollgate.toml" serve --listen "127.0.0.1:$port" "$@" >"$WORK/tg-$name.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_port "$port"
    local url="http://127.0.0.1:$port/v1/chat/completions"
    "$OHA" --no-tui -q "$RATE" -z 3s -c "$CONNS" -m POST -H "authorization: Bearer $key" \
        -H 'content-type: application/json' -d "$BODY" "$url" >/dev/null 2>&1 || true
    "$OHA" --no-tui --latency-correction --output-format json -q "$RATE" -z "${SECS}s" -c "$CONNS" -m POST \
        -H "authorization: Bearer $key" -H 'content-type: application/json' -d "$BODY" "$url" \
        >"$WORK/$name.json"
    kill "$pid" 2>/dev/null || true
    python3 - "$name" "$WORK/$name.json" <<'PY'
import json, sys
name, path = sys.argv[1], sys.argv[2]
d = json.load(open(path))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if k != "200")
print(f"{name:7s} p50 {p['p50']*1000:7.3f} ms  p90 {p['p90']*1000:7.3f} ms  p99 {p['p99']*1000:7.3f} ms  "
      f"rps {d['summary']['requestsPerSec']:8.1f}  non-200 {bad}")
PY
}

{
    echo "# tollgate limiter overhead, $(date -u +%FT%TZ), RATE=$RATE/s SECS=$SECS CONNS=$CONNS, $(nproc) CPUs"
    run none "$KEY_NONE"
    run memory "$KEY_LIMITED"
    run redis "$KEY_LIMITED" --redis-url "redis://127.0.0.1:$REDIS_PORT/"
} | tee "$REPORT"
log "written to $REPORT"
