#!/usr/bin/env bash
#! Shared shell functions for tollgate's benchmarks: tools, process start/stop, CPU placement,
#! CPU and RSS accounting from /proc, bounded load runs that append one JSON line per measurement.
#
# Source it from a bench script (bench/gateway.sh and later bench/*.sh):
#     . "$(dirname "$0")/lib.sh"
# Everything it starts is recorded and stopped by its own PID on exit; only loopback addresses
# are ever used; every load step has a duration bound.

set -euo pipefail

BENCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$BENCH_DIR/.." && pwd)
# Tools live outside git: .tools/ (oha, the bench-floor build) and bench/.venv (LiteLLM) are ignored.
TOOLS=${TOOLS:-$ROOT/.tools}
for v in $("$ROOT"/scripts/ggml-cpu-flags.sh); do export "${v?}"; done # llama.cpp build options as `make` sets them
FLOOR_SRC=${FLOOR_SRC:-$ROOT/../shared/bench-floor}
[ -d "$FLOOR_SRC" ] || FLOOR_SRC=/work/shared/bench-floor
GWBENCH=${GWBENCH:-$TOOLS/gwbench-target/release/gwbench}
OHA=${OHA:-$TOOLS/bin/oha}
VENV=${VENV:-$BENCH_DIR/.venv}
# PGO=1: the profile-guided build of `make release-pgo` (scripts/pgo-build.sh) instead of
# `cargo build --release`'s.
PGO=${PGO:-0}
if [ "$PGO" = 1 ]; then
    TOLLGATE=${TOLLGATE:-$ROOT/target/pgo/tollgate}
else
    TOLLGATE=${TOLLGATE:-$ROOT/target/release/tollgate}
fi
HOST=127.0.0.1
PORT_BASE=${PORT_BASE:-19100}
# pinned: the server under test on CPU1, fake upstream + load generator on CPU0 (performance.md
# §6.3 run A). unpinned: nobody pinned (run B). A "-cfs" suffix (unpinned-cfs) runs that placement
# with ordinary scheduling (nice -10) instead of SCHED_FIFO, see sched_now.
PLACEMENT=${PLACEMENT:-pinned}
RUN_ID=${RUN_ID:-$(date -u +%Y%m%dT%H%M%SZ)}
OUT_DIR=${OUT_DIR:-$BENCH_DIR/results/$RUN_ID}
RESULTS=$OUT_DIR/results.jsonl
mkdir -p "$OUT_DIR"
touch "$RESULTS"

STARTED_PIDS=()
# Everything the bench starts (servers, fake upstreams, load) runs at this nice level; as root the
# default -10 keeps other work on a shared box from landing in the measurements.
if [ "$(id -u)" = 0 ]; then NICE=${NICE:--10}; else NICE=${NICE:-0}; fi
CLK_TCK=$(getconf CLK_TCK)
NCPU=$(nproc)

log() { printf '[bench %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# ---------------------------------------------------------------- tools

ensure_gwbench() {
    [ -x "$GWBENCH" ] && return 0
    [ -f "$FLOOR_SRC/Cargo.toml" ] || die "bench-floor source not found at $FLOOR_SRC (set FLOOR_SRC)"
    log "building the bench-floor (gwbench) into $TOOLS/gwbench-target"
    cargo build --release --quiet --manifest-path "$FLOOR_SRC/Cargo.toml" --target-dir "$TOOLS/gwbench-target"
}

ensure_oha() {
    [ -x "$OHA" ] && return 0
    log "installing oha into $TOOLS (cargo install; once)"
    cargo install oha --locked --quiet --root "$TOOLS"
}

ensure_litellm() {
    [ -x "$VENV/bin/litellm" ] && return 0
    log "installing litellm[proxy] into $VENV (pip; once)"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet 'litellm[proxy]'
}

# open_config FILE PORT UPSTREAM_PORT: a minimal tollgate config in open mode (no key, no billing)
# with one OpenAI-dialect provider on the loopback fake upstream serving model gpt-4o-mini; for the
# benches that measure the request path alone (profile.sh, ab.sh).
open_config() {
    cat >"$1" <<TOML
[server]
listen = "$HOST:$2"
# Open mode (loopback only): the hop's own cost without key lookup or billing, which have their
# own benches (bench/billing.sh, bench/limits.sh).
[auth]
required = false

[database]
url = "sqlite://${1%.toml}.db"
[[providers]]
name = "bench"
base_url = "http://$HOST:$3/v1"
dialect = "openai"
[[models]]
id = "gpt-4o-mini"
  [[models.routes]]
  provider = "bench"
  upstream_model = "gpt-4o-mini"
TOML
}

ensure_tollgate() {
    if [ "${BUILD:-1}" = 1 ] && [ "$PGO" = 1 ]; then
        log "scripts/pgo-build.sh (tollgate, profile-guided)"
        "$ROOT/scripts/pgo-build.sh" >&2
    elif [ "${BUILD:-1}" = 1 ]; then
        log "cargo build --release (tollgate)"
        (cd "$ROOT" && cargo build --release --quiet --bin tollgate)
    fi
    [ -x "$TOLLGATE" ] || die "no tollgate binary at $TOLLGATE"
}

# ---------------------------------------------------------------- processes

# start NAME CMD...: run CMD in the background with its output in $OUT_DIR/NAME.log; its PID is
# left in LAST_PID and recorded for cleanup.
LAST_PID=
start() {
    local name=$1; shift
    nice -n "$NICE" "$@" >"$OUT_DIR/$name.log" 2>&1 &
    LAST_PID=$!
    disown "$LAST_PID" # no "Killed" chatter when we stop it
    STARTED_PIDS+=("$LAST_PID")
}

# descendants PID: PID and all its descendants (by parent PID, never by name).
descendants() {
    local p=$1 c
    echo "$p"
    for c in $(pgrep -P "$p" 2>/dev/null || true); do descendants "$c"; done
}

stop_pid() {
    local p=$1 d all
    all=$(descendants "$p")
    for d in $all; do kill "$d" 2>/dev/null || true; done
    for _ in $(seq 1 50); do
        local alive=0
        for d in $all; do kill -0 "$d" 2>/dev/null && alive=1; done
        [ $alive = 0 ] && return 0
        sleep 0.1
    done
    for d in $all; do kill -9 "$d" 2>/dev/null || true; done
}

cleanup() {
    local p f
    for p in "${STARTED_PIDS[@]:-}"; do [ -n "$p" ] && stop_pid "$p"; done
    STARTED_PIDS=()
    # servers' access logs can reach hundreds of MB under saturation: keep the last 1 MB of each
    for f in "$OUT_DIR"/*.log; do
        [ -f "$f" ] && [ "$(stat -c %s "$f")" -gt 20000000 ] && { tail -c 1000000 "$f" >"$f.tail" && mv "$f.tail" "$f"; }
    done
    return 0
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# wait_http URL SECS: wait until something answers HTTP at URL (any status).
wait_http() {
    local url=$1 secs=${2:-30} i
    for i in $(seq 1 $((secs * 10))); do
        if curl -s -o /dev/null --max-time 1 "$url"; then return 0; fi
        sleep 0.1
    done
    return 1
}

# place ROLE PID: set the CPU affinity and scheduling class (SCHED) of PID, its threads and
# descendants for the current PLACEMENT. ROLE is "server" (the proxy under test) or "harness".
place() {
    local role=$1 pid=$2 cpus d
    cpus=$(cpus_for "$role")
    for d in $(descendants "$pid"); do
        taskset -a -p -c "$cpus" "$d" >/dev/null 2>&1 || true
        if [ "$(sched_now)" = rt ]; then
            chrt -a -f -p 1 "$d" >/dev/null 2>&1 || true
        else
            chrt -a -o -p 0 "$d" >/dev/null 2>&1 || true
        fi
    done
}

# SCHED=rt runs servers, fake upstreams and the load generator as SCHED_FIFO priority 1 while
# measuring, so a busy shared box's other work (compilers of other users) cannot put its time
# slices into a measurement: the result is what the machine can do, not what was left of it.
# The kernel's RT throttle (95% of each second) still leaves the rest of the box some CPU, and
# every step is bounded in time. RT=0 runs everything as ordinary (nice -10) processes.
SCHED=normal
RT=${RT:-1}
# With SCHED_FIFO a woken real-time task is pushed to the CPU running the lowest priority, i.e.
# never the waker's own busy CPU, so at c=1 every hop (load -> proxy -> mock -> proxy -> load)
# crosses CPUs, an inter-processor interrupt through the KVM host each time. The ordinary
# scheduler keeps a c=1 chain on one CPU (wake-affine), as performance.md §4 measured the floor.
# Placements ending in -cfs measure that way; the others stay SCHED_FIFO.
sched_now() {
    if [[ $PLACEMENT == *-cfs ]]; then
        echo normal
    elif [ "$SCHED" = rt ] && [ "$RT" = 1 ] && [ "$(id -u)" = 0 ] && command -v chrt >/dev/null; then
        echo rt
    else
        echo normal
    fi
}
sched_prefix() { [ "$(sched_now)" = rt ] && echo "chrt -f 1"; return 0; }
cpus_for() {
    if [[ $PLACEMENT == pinned* ]] && [ "$NCPU" -ge 2 ]; then
        [ "$1" = server ] && echo 1 || echo 0
    else
        echo "0-$((NCPU - 1))"
    fi
}

# ---------------------------------------------------------------- /proc accounting

# cpu_ticks PID: utime+stime of PID and its descendants, in clock ticks.
cpu_ticks() {
    local t=0 d v
    for d in $(descendants "$1"); do
        v=$(awk '{print $14+$15}' "/proc/$d/stat" 2>/dev/null || echo 0)
        t=$((t + v))
    done
    echo "$t"
}
# rss_kb PID: VmRSS of PID plus its descendants (LiteLLM's workers), KiB.
rss_kb() {
    local t=0 d v
    for d in $(descendants "$1"); do
        v=$(awk '/^VmRSS:/{print $2}' "/proc/$d/status" 2>/dev/null || echo 0)
        t=$((t + ${v:-0}))
    done
    echo "$t"
}
# rss_sampler PID FILE: sample rss_kb every 250 ms and keep the max in FILE until killed.
rss_sampler() {
    local pid=$1 file=$2 max=0 r
    echo 0 >"$file"
    while kill -0 "$pid" 2>/dev/null; do
        r=$(rss_kb "$pid")
        if [ "$r" -gt "$max" ]; then max=$r; echo "$max" >"$file.tmp" && mv "$file.tmp" "$file"; fi
        sleep 0.25
    done
}
# reset_hwm PID: reset the kernel's peak-RSS mark (VmHWM) of PID and its descendants.
reset_hwm() {
    local d
    for d in $(descendants "$1"); do echo 5 >"/proc/$d/clear_refs" 2>/dev/null || true; done
}

# settle PID: wait (at most 30 s) until PID's tree is nearly idle, so a backlog left by an
# overloaded server (LiteLLM) does not leak into the next measurement.
settle() {
    local pid=$1 a b i
    for i in $(seq 1 60); do
        a=$(cpu_ticks "$pid"); sleep 0.5; b=$(cpu_ticks "$pid")
        [ $((b - a)) -le $((CLK_TCK / 20)) ] && return 0
    done
    log "settle: $pid still busy after 30 s"
}

# ---------------------------------------------------------------- measurements

# record JSON: append one result line (a JSON object) to $RESULTS.
record() { echo "$1" >>"$RESULTS"; }

# measure LABELJSON SERVERPID -- CMD...: run CMD (a load generator printing one JSON object),
# account SERVERPID's CPU and peak RSS over the run, and record the merged object.
# LABELJSON is a JSON fragment like '"test":"c1","target":"floor"'. SERVERPID may be 0 (direct).
measure() {
    local label=$1 spid=$2; shift 3
    local t0 t1 out cpu0=0 cpu1=0 rssf="$OUT_DIR/.rss.$$" spl="" w0 w1
    if [ "$spid" != 0 ]; then
        cpu0=$(cpu_ticks "$spid")
        reset_hwm "$spid"
        rss_sampler "$spid" "$rssf" &
        spl=$!
    fi
    w0=$(date +%s.%N)
    out=$("$@" 2>>"$OUT_DIR/load.err") || out='{}'
    w1=$(date +%s.%N)
    local extra="\"placement\":\"$PLACEMENT\",\"sched\":\"$(sched_now)\",\"wall_s\":$(awk -v a="$w0" -v b="$w1" 'BEGIN{printf "%.2f", b-a}')"
    if [ "$spid" != 0 ]; then
        cpu1=$(cpu_ticks "$spid")
        kill "$spl" 2>/dev/null || true
        wait "$spl" 2>/dev/null || true
        local peak
        peak=$(cat "$rssf" 2>/dev/null || true)
        extra="$extra,\"server_cpu_s\":$(awk -v a="$cpu0" -v b="$cpu1" -v t="$CLK_TCK" 'BEGIN{printf "%.3f", (b-a)/t}'),\"server_rss_peak_kb\":${peak:-0},\"server_hwm_kb\":$(awk '/^VmHWM:/{print $2}' "/proc/$spid/status" 2>/dev/null || echo 0),\"server_rss_end_kb\":$(rss_kb "$spid")"
        rm -f "$rssf"
    fi
    out=$(printf '%s' "$out" | tr -d '\n')
    [ "$out" = "{}" ] && out='{"failed":true}'
    local line="{$label,$extra,${out#\{}"
    record "$line"
    log "$(printf '%s' "$line" | cut -c1-220)"
    echo "$line"
}

# gw_load URL CONNS SECS STREAM [RATE_PER_CONN]: closed-loop (or per-connection paced) load
# from the bench-floor load generator; one JSON line. Killed GRACE seconds after SECS.
gw_load() {
    # shellcheck disable=SC2046
    THREADS=${LOAD_THREADS:-1} timeout -k 5 $(($3 + ${GRACE:-30})) nice -n "$NICE" $(sched_prefix) \
        taskset -c "$(cpus_for harness)" "$GWBENCH" load "$@"
}

# oha_open URL RATE CONNS SECS: open-loop load (oha -q, latency corrected), normalised to one
# JSON line with the same keys as gw_load.
oha_open() {
    local url=$1 rate=$2 conns=$3 secs=$4 body="$OUT_DIR/.body.json"
    printf '%s' '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"Return one short sentence about latency."}],"max_tokens":16}' >"$body"
    timeout -k 5 $((secs + ${GRACE:-30})) nice -n "$NICE" $(sched_prefix) taskset -c "$(cpus_for harness)" "$OHA" --no-tui --output-format json -q "$rate" --latency-correction -c "$conns" -z "${secs}s" \
        -t 10s -m POST -H 'content-type: application/json' -H 'authorization: Bearer sk-bench' \
        -D "$body" "$url" | python3 "$BENCH_DIR/oha2json.py" "$conns" "$rate"
}
