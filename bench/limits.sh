#!/usr/bin/env bash
# Added latency of the rate-limit check at a fixed 1,000 req/s (open loop, oha -q, latency
# correction), through a loopback fake upstream (bench-floor's `gwbench mock`, zero delay).
#
# Three tollgate servers (release build) run side by side on one SQLite store:
#   mem     in-process limiter            plan and overrides read from the database per request
#   redis   limiter in a local redis-server (one Lua EVALSHA per check, one per settlement)
#   cached  in-process, `[limits] subject_cache_ms = 60000` (plan/overrides read once a minute)
# and each round measures, in a rotating order, these cases:
#   off          mem,    a key whose account has no plan (the limiter is skipped)  -> baseline
#   memory       mem,    a key whose plan sets rpm, tpm, max_concurrent, rpd, tpd and spend caps
#   redis_off    redis,  the no-plan key                                           -> baseline
#   redis        redis,  the limited key
#   cached_off   cached, the no-plan key: the same as `off` minus the per-request database read
# Limits are far above the offered load, so every request is admitted; "added" is limited minus
# off on the same server in the same round (median over rounds). Billing (SQLite) is on in every
# case (keys are database keys), so its cost is in the baselines too.
#
#   flock /work/notes/bench.lock bench/limits.sh   # RATE=1000 SECS=10 ROUNDS=3 CONNS=32 NICE=-10
# Prints one line per measurement and a summary table; writes both to
# bench/results/limits-<time>.txt. Tools: oha (.tools/bin/oha or $OHA; `cargo install oha` once),
# gwbench ($GWBENCH, or built from /work/shared/bench-floor), redis-server (Debian package).
# Everything runs on 127.0.0.1 and is stopped by PID on exit.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
for v in $("$ROOT"/scripts/ggml-cpu-flags.sh); do export "${v?}"; done # llama.cpp build options as `make` sets them
RATE=${RATE:-1000}
SECS=${SECS:-10}
ROUNDS=${ROUNDS:-3}
CONNS=${CONNS:-32}
# The machine is shared: run every process of the bench at this niceness (root can go below 0).
NICE=${NICE:--10}
RUN=(nice -n "$NICE")
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
wait_port() { for _ in $(seq 1 400); do (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null && return 0; sleep 0.05; done; return 1; }

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
THREADS=1 "${RUN[@]}" "$GWBENCH" mock "127.0.0.1:$UP_PORT" 0 >"$WORK/mock.log" 2>&1 &
PIDS+=($!)
REDIS_PORT=$(free_port)
"${RUN[@]}" redis-server --port "$REDIS_PORT" --bind 127.0.0.1 --save '' --appendonly no --dir "$WORK" >"$WORK/redis.log" 2>&1 &
PIDS+=($!)
wait_port "$UP_PORT"
wait_port "$REDIS_PORT"

config() { # config CACHE_MS
    cat <<EOF
[server]
listen = "127.0.0.1:0"
metrics = false
[auth]
required = true
[database]
url = "sqlite://$WORK/tollgate.db"
[limits]
subject_cache_ms = $1
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
}
config 0 >"$WORK/tollgate.toml"
config 60000 >"$WORK/cached.toml"
export TOLLGATE_SECRET=limits-bench-secret-0123456789abcdef
tg() { "$TOLLGATE" --config "$WORK/tollgate.toml" "$@"; }
tg accounts create none >/dev/null
tg accounts create limited --plan big >/dev/null
for a in none limited; do tg credits add "$a" 1000000 --reason bench >/dev/null; done
KEY_NONE=$(tg keys create --account none)
KEY_LIMITED=$(tg keys create --account limited)
BODY='{"model":"m","messages":[{"role":"user","content":"Say something short."}],"max_tokens":32}'

declare -A PORT SPID
serve() { # serve NAME CONFIG [ARGS...]
    local name=$1 cfg=$2; shift 2
    local port; port=$(free_port)
    RUST_LOG=warn "${RUN[@]}" "$TOLLGATE" --config "$cfg" serve --listen "127.0.0.1:$port" "$@" >"$WORK/tg-$name.log" 2>&1 &
    PIDS+=($!)
    SPID[$name]=$!
    wait_port "$port"
    PORT[$name]=$port
}
REDIS_PID=${PIDS[1]}
# CPU time (clock ticks, utime + stime) a process has used so far.
ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
serve mem "$WORK/tollgate.toml"
serve redis "$WORK/tollgate.toml" --redis-url "redis://127.0.0.1:$REDIS_PORT/"
serve cached "$WORK/cached.toml"

declare -A SERVER=([off]=mem [memory]=mem [redis_off]=redis [redis]=redis [cached_off]=cached)
declare -A KEY=([off]=$KEY_NONE [memory]=$KEY_LIMITED [redis_off]=$KEY_NONE [redis]=$KEY_LIMITED [cached_off]=$KEY_NONE)
CASES=(off memory redis_off redis cached_off)

oha_run() { # oha_run CASE SECONDS OUTFILE
    local url="http://127.0.0.1:${PORT[${SERVER[$1]}]}/v1/chat/completions"
    "${RUN[@]}" "$OHA" --no-tui --latency-correction --output-format json -q "$RATE" -z "$2" -c "$CONNS" -m POST \
        -H "authorization: Bearer ${KEY[$1]}" -H 'content-type: application/json' -d "$BODY" "$url" >"$3"
}

{
    echo "# tollgate limiter overhead, $(date -u +%FT%TZ), git $(cd "$ROOT" && git rev-parse --short HEAD), RATE=$RATE/s SECS=$SECS ROUNDS=$ROUNDS CONNS=$CONNS NICE=$NICE, $(nproc) CPUs, load average at start: $(cut -d' ' -f1-3 /proc/loadavg)"
    for c in "${CASES[@]}"; do oha_run "$c" 2s /dev/null || true; done   # warm-up
    for r in $(seq 1 "$ROUNDS"); do
        # rotate the order every round
        n=${#CASES[@]}
        for i in $(seq 0 $((n - 1))); do
            c=${CASES[$(( (i + r - 1) % n ))]}
            spid=${SPID[${SERVER[$c]}]}
            t0=$(ticks "$spid"); r0=$(ticks "$REDIS_PID")
            oha_run "$c" "${SECS}s" "$WORK/$c-$r.json"
            t1=$(ticks "$spid"); r1=$(ticks "$REDIS_PID")
            python3 - "$c" "$r" "$WORK/$c-$r.json" $((t1 - t0)) $((r1 - r0)) "$(getconf CLK_TCK)" <<'PY'
import json, sys
name, rnd, path = sys.argv[1], sys.argv[2], sys.argv[3]
tg_ticks, redis_ticks, hz = int(sys.argv[4]), int(sys.argv[5]), int(sys.argv[6])
d = json.load(open(path))
p = d["latencyPercentiles"]
codes = d.get("statusCodeDistribution", {})
bad = sum(v for k, v in codes.items() if k != "200")
n = max(sum(codes.values()), 1)
d["cpu_us_per_req"] = tg_ticks * 1e6 / hz / n
d["redis_cpu_us_per_req"] = redis_ticks * 1e6 / hz / n
json.dump(d, open(path, "w"))
print(f"round {rnd} {name:10s} p50 {p['p50']*1000:7.3f} ms  p90 {p['p90']*1000:7.3f} ms  p99 {p['p99']*1000:7.3f} ms  "
      f"rps {d['summary']['requestsPerSec']:8.1f}  non-200 {bad}  tollgate CPU {d['cpu_us_per_req']:6.1f} us/req  "
      f"redis CPU {d['redis_cpu_us_per_req']:5.1f} us/req", flush=True)
PY
        done
        echo "round $r load average: $(cut -d' ' -f1-3 /proc/loadavg)"
    done
    python3 - "$WORK" "$ROUNDS" <<'PY'
import json, statistics, sys
work, rounds = sys.argv[1], int(sys.argv[2])
cases = ["off", "memory", "redis_off", "redis", "cached_off"]
d = {(c, r): json.load(open(f"{work}/{c}-{r}.json")) for c in cases for r in range(1, rounds + 1)}
def pct(c, r, q): return d[(c, r)]["latencyPercentiles"][q] * 1000
med = statistics.median
print()
print("| case | p50 ms | p90 ms | p99 ms | req/s | non-200 | tollgate CPU µs/req | redis CPU µs/req |")
print("|---|---|---|---|---|---|---|---|")
for c in cases:
    bad = sum(v for r in range(1, rounds + 1) for k, v in d[(c, r)].get("statusCodeDistribution", {}).items() if k != "200")
    print(f"| {c} | {med(pct(c, r, 'p50') for r in range(1, rounds + 1)):.3f} | "
          f"{med(pct(c, r, 'p90') for r in range(1, rounds + 1)):.3f} | "
          f"{med(pct(c, r, 'p99') for r in range(1, rounds + 1)):.3f} | "
          f"{med(d[(c, r)]['summary']['requestsPerSec'] for r in range(1, rounds + 1)):.0f} | {bad} | "
          f"{med(d[(c, r)]['cpu_us_per_req'] for r in range(1, rounds + 1)):.1f} | "
          f"{med(d[(c, r)]['redis_cpu_us_per_req'] for r in range(1, rounds + 1)):.1f} |")
print()
print("| added (median of per-round differences) | p50 ms | p90 ms | p99 ms | tollgate CPU µs/req | + redis CPU µs/req |")
print("|---|---|---|---|---|---|")
for label, a, b in [("limiter, in process (memory − off)", "memory", "off"),
                    ("limiter, Redis (redis − redis_off)", "redis", "redis_off"),
                    ("plan + overrides read per request (off − cached_off)", "off", "cached_off")]:
    row = [med(pct(a, r, q) - pct(b, r, q) for r in range(1, rounds + 1)) for q in ("p50", "p90", "p99")]
    cpu = med(d[(a, r)]["cpu_us_per_req"] - d[(b, r)]["cpu_us_per_req"] for r in range(1, rounds + 1))
    rcpu = med(d[(a, r)]["redis_cpu_us_per_req"] - d[(b, r)]["redis_cpu_us_per_req"] for r in range(1, rounds + 1))
    print(f"| {label} | " + " | ".join(f"{x:+.3f}" for x in row) + f" | {cpu:+.1f} | {rcpu:+.1f} |")
PY
} | tee "$REPORT"
log "written to $REPORT"
