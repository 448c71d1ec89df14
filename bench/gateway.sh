#!/usr/bin/env bash
#! What tollgate adds to a chat-completions request (issue 2; performance.md §6.3): the same loads
#! sent direct to a fake upstream, through tollgate, through the bench-floor bare hyper proxy and
#! through LiteLLM proxy, all on loopback, each step time.
#
# Usage: bench/run.sh gateway          (or directly: bench/gateway.sh)
# Knobs (environment): TARGETS="direct floor tollgate litellm", PLACEMENT=pinned|unpinned,
#   QUICK=1 (shorter steps), BUILD=0 (use the existing binary, no build), PORT_BASE=19100,
#   LITELLM_STREAMS=1 (also hold OPEN_STREAMS streams open through LiteLLM),
#   TESTS="c1 sat open ttft chunk streams" (a subset runs only those steps), and the step knobs below.
#   PGO=1 (default): tollgate is the profile-guided build of `make release-pgo`
#   (target/pgo/tollgate, built by scripts/pgo-build.sh unless BUILD=0); PGO=0: the plain
#   `cargo build --release` binary. TOLLGATE=path measures any other binary.

PGO=${PGO:-1} # before lib.sh, whose default is the plain release build
. "$(dirname "$0")/lib.sh"

QUICK=${QUICK:-0}
if [ "$QUICK" = 1 ]; then S=0.4; else S=1; fi
secs() { awk -v a="$1" -v s="$S" 'BEGIN{v=int(a*s+0.5); if(v<1)v=1; print v}'; }

C1_ROUNDS=${C1_ROUNDS:-5}      # interleaved rounds, c=1, zero-delay upstream
C1_SECS=$(secs "${C1_SECS:-3}")
SAT_CONNS=${SAT_CONNS:-32}     # closed loop, zero-delay upstream
SAT_SECS=$(secs "${SAT_SECS:-8}")
SAT_REPS=${SAT_REPS:-2}
SAT_PLACEMENTS=${SAT_PLACEMENTS:-"pinned unpinned"}
LAT_PLACEMENTS=${LAT_PLACEMENTS:-"pinned unpinned unpinned-cfs"} # c=1 latency and TTFT
OPEN_RATE=${OPEN_RATE:-3000}   # open loop, 60 ms upstream
OPEN_CONNS=${OPEN_CONNS:-400}
OPEN_SECS=$(secs "${OPEN_SECS:-15}")
OPEN_WARM=$(secs 3)
TTFT_ROUNDS=${TTFT_ROUNDS:-3}  # c=1 streams from the paced upstream
TTFT_SECS=$(secs "${TTFT_SECS:-5}")
CHUNK_CONNS=${CHUNK_CONNS:-16} # unpaced 34-frame streams: CPU per frame
CHUNK_SECS=$(secs "${CHUNK_SECS:-6}")
OPEN_STREAMS=${OPEN_STREAMS:-1000}
STREAMS_SECS=$(secs "${STREAMS_SECS:-15}")
[ "$QUICK" = 1 ] && OPEN_STREAMS=${QUICK_STREAMS:-300}

# Fake upstream modes (gwbench mock DELAY_MS CHUNKS INTERVAL_MS). Non-stream requests ignore
# CHUNKS/INTERVAL, so "zero" serves both the zero-delay tests and the paced-SSE TTFT test.
declare -A MOCK_ARGS=(
    [zero]="0 4 20"      # zero delay; streams: 4 deltas 20 ms apart (+usage chunk +[DONE])
    [d60]="60 64 20"     # 60 ms before the answer (open-loop test)
    [sse0]="0 32 0"      # unpaced 32-delta streams: per-frame CPU and latency
    [slow]="0 64 100"    # 64 deltas 100 ms apart (6.4 s streams): memory per open stream
)
declare -A MOCK_FRAMES=([zero]=6 [d60]=66 [sse0]=34 [slow]=66)
MODES=(zero d60 sse0 slow)
declare -A MOCK_PORT=([zero]=0 [d60]=1 [sse0]=2 [slow]=3)
declare -A TARGET_OFF=([floor]=10 [tollgate]=20 [litellm]=30)

TARGETS=${TARGETS:-"direct floor tollgate litellm"}
TESTS=${TESTS:-"c1 sat open ttft chunk streams"} # which steps to run
want() { [[ " $TESTS " == *" $1 "* ]]; }
have_tollgate_cli() { [ -f "$ROOT/src/cli.rs" ] && grep -q 'serve' "$ROOT/src/cli.rs" 2>/dev/null; }
if [[ " $TARGETS " == *" tollgate "* ]] && ! have_tollgate_cli && [ ! -x "$TOLLGATE" ]; then
    log "tollgate has no 'serve' command yet on this branch: skipping target tollgate"
    TARGETS=${TARGETS// tollgate/}
fi
read -r -a TGT <<<"$TARGETS"

declare -A URL PID
mock_port() { echo $((PORT_BASE + MOCK_PORT[$1])); }
proxy_port() { echo $((PORT_BASE + TARGET_OFF[$1] + MOCK_PORT[$2])); }

# ---------------------------------------------------------------- configs

tollgate_config() { # MODE -> path
    local m=$1 f="$OUT_DIR/tollgate-$1.toml"
    cat >"$f" <<EOF
# tollgate bench config: one OpenAI-dialect provider on the loopback fake upstream.
[server]
listen = "$HOST:$(proxy_port tollgate "$m")"

# Open mode (loopback only): the hop's own cost without key lookup or billing, which have their
# own benches (bench/billing.sh, bench/limits.sh). The floor checks a static bearer token.
[auth]
required = false

[database]
url = "sqlite://$OUT_DIR/tollgate-$m.db"

[[providers]]
name = "bench"
base_url = "http://$HOST:$(mock_port "$m")/v1"
api_key_env = "BENCH_UPSTREAM_KEY"
dialect = "openai"

[[models]]
id = "gpt-4o-mini"
context_length = 128000
max_output_tokens = 16384
  [[models.routes]]
  provider = "bench"
  upstream_model = "gpt-4o-mini"
  price_per_mtok = { input = 0.15, cached_input = 0.075, output = 0.60 }
EOF
    echo "$f"
}

litellm_config() { # MODE -> path
    local m=$1 f="$OUT_DIR/litellm-$1.yaml"
    cat >"$f" <<EOF
# LiteLLM bench config: one model on the loopback fake upstream, master key only, no DB.
model_list:
  - model_name: gpt-4o-mini
    litellm_params:
      model: openai/gpt-4o-mini
      api_base: http://$HOST:$(mock_port "$m")/v1
      api_key: upstream-key
general_settings:
  master_key: sk-bench
litellm_settings:
  telemetry: false
  drop_params: true
EOF
    echo "$f"
}

# ---------------------------------------------------------------- start

start_target() { # TARGET MODE
    local t=$1 m=$2 port cfg
    if [ "$t" = direct ]; then
        URL[$t.$m]="http://$HOST:$(mock_port "$m")/v1/chat/completions"
        PID[$t.$m]=${PID[mock.$m]}
        return
    fi
    port=$(proxy_port "$t" "$m")
    case $t in
    floor)
        THREADS=2 start "floor-$m" "$GWBENCH" proxy "$HOST:$port" "http://$HOST:$(mock_port "$m")/v1/chat/completions"
        ;;
    tollgate)
        cfg=$(tollgate_config "$m")
        # tollgate as shipped: its default log level (info: one access line per request, to the
        # log file here). TOLLGATE_LOG=warn (a RUST_LOG filter) measures it without that line.
        if [ -n "${TOLLGATE_LOG:-}" ]; then export RUST_LOG=$TOLLGATE_LOG; else unset RUST_LOG; fi
        BENCH_UPSTREAM_KEY=upstream-key start "tollgate-$m" "$TOLLGATE" serve --config "$cfg"
        ;;
    litellm)
        cfg=$(litellm_config "$m")
        # no network here: use the bundled cost map; python start-up is slow, so give workers time
        LITELLM_LOG=ERROR LITELLM_TELEMETRY=False LITELLM_LOCAL_MODEL_COST_MAP=True \
            TIMEOUT_WORKER_HEALTHCHECK=300 \
            start "litellm-$m" "$VENV/bin/litellm" --config "$cfg" \
            --host "$HOST" --port "$port" --num_workers "${LITELLM_WORKERS:-2}"
        ;;
    esac
    PID[$t.$m]=$LAST_PID
    URL[$t.$m]="http://$HOST:$port/v1/chat/completions"
}

wait_target() { # TARGET MODE
    local t=$1 m=$2 port
    [ "$t" = direct ] && return 0
    port=$(proxy_port "$t" "$m")
    wait_http "http://$HOST:$port/" 300 || die "$t ($m) did not come up on :$port; see $OUT_DIR/$t-$m.log"
    # one real request must succeed before we measure
    local code
    code=$(curl -s -o "$OUT_DIR/.probe" -w '%{http_code}' --max-time 20 -H 'content-type: application/json' \
        -H 'authorization: Bearer sk-bench' \
        -d '{"model":"gpt-4o-mini","messages":[{"role":"user","content":"hi"}],"max_tokens":16}' "${URL[$t.$m]}")
    [ "$code" = 200 ] || die "$t ($m) answered $code: $(head -c 300 "$OUT_DIR/.probe")"
}

machine_info() {
    local cpu load
    cpu=$(awk -F: '/model name/{gsub(/^ /,"",$2); print $2; exit}' /proc/cpuinfo)
    load=$(cut -d' ' -f1-3 /proc/loadavg)
    record "{\"test\":\"meta\",\"run_id\":\"$RUN_ID\",\"placement\":\"$PLACEMENT\",\"nproc\":$NCPU,\"cpu\":\"$cpu\",\"loadavg_start\":\"$load\",\"quick\":$QUICK,\"targets\":\"$TARGETS\",\"git\":\"$(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo none)\",\"tollgate_bin\":\"$TOLLGATE\",\"litellm\":\"$("$VENV/bin/pip" show litellm 2>/dev/null | awk '/^Version/{print $2}')\",\"frames\":{\"zero\":${MOCK_FRAMES[zero]},\"sse0\":${MOCK_FRAMES[sse0]},\"slow\":${MOCK_FRAMES[slow]}},\"open_streams\":$OPEN_STREAMS,\"nice\":$NICE}"
}

# rotate LIST N: the list rotated left by N (interleaved order changes every round)
rotate() { local n=$1; shift; local a=("$@") k=${#a[@]} i; for ((i = 0; i < k; i++)); do printf '%s ' "${a[$(((i + n) % k))]}"; done; }

# placement for one measurement: server under test on CPU1, mocks on CPU0 (pinned)
place_for() { # TARGET MODE
    local m
    for m in "${MODES[@]}"; do [ -n "${PID[mock.$m]:-}" ] && place harness "${PID[mock.$m]}"; done
    [ "$1" != direct ] && place server "${PID[$1.$2]}"
    return 0
}

# ---------------------------------------------------------------- main

ensure_gwbench
ensure_oha
[[ " $TARGETS " == *" litellm "* ]] && ensure_litellm
[[ " $TARGETS " == *" tollgate "* ]] && ensure_tollgate
machine_info
log "results -> $RESULTS (placement $PLACEMENT, targets: $TARGETS)"

for m in "${MODES[@]}"; do
    # shellcheck disable=SC2086
    THREADS=1 start "mock-$m" "$GWBENCH" mock "$HOST:$(mock_port "$m")" ${MOCK_ARGS[$m]}
    PID[mock.$m]=$LAST_PID
done
for m in zero d60 sse0; do for t in "${TGT[@]}"; do start_target "$t" "$m"; done; done
for m in "${MODES[@]}"; do wait_http "http://$HOST:$(mock_port "$m")/" 10 || die "mock $m did not start"; done
for m in zero d60 sse0; do for t in "${TGT[@]}"; do wait_target "$t" "$m"; done; done
log "all servers up"
SCHED=rt # every measured step (see lib.sh: RT=0 to run as ordinary processes)

# interleaved TEST MODE CONNS SECS STREAM ROUNDS PLACEMENTS: ROUNDS rounds over all targets in a
# rotated order, in each placement; one recorded line per (placement, round, target).
interleaved() {
    local test=$1 mode=$2 conns=$3 secs=$4 stream=$5 rounds=$6 pls=$7 pl r t saved=$PLACEMENT
    for pl in $pls; do
        PLACEMENT=$pl
        for r in $(seq 1 "$rounds"); do
            for t in $(rotate "$r" "${TGT[@]}"); do
                place_for "$t" "$mode"
                measure "\"test\":\"$test\",\"target\":\"$t\",\"round\":$r" "${PID[$t.$mode]}" -- \
                    gw_load "${URL[$t.$mode]}" "$conns" "$secs" "$stream" >/dev/null
                [ "$conns" -gt 1 ] && settle "${PID[$t.$mode]}"
            done
        done
    done
    PLACEMENT=$saved
}

# 1. added latency at c=1, zero-delay upstream: warm-up, then interleaved rounds in each placement
if want c1; then
    for t in "${TGT[@]}"; do place_for "$t" zero; gw_load "${URL[$t.zero]}" 1 2 0 >/dev/null || true; done
    interleaved c1 zero 1 "$C1_SECS" 0 "$C1_ROUNDS" "$LAT_PLACEMENTS"
    log "c=1 latency done"
fi

# 2. saturated req/s, zero-delay upstream, closed loop, in each placement
if want sat; then
    interleaved sat zero "$SAT_CONNS" "$SAT_SECS" 0 "$SAT_REPS" "$SAT_PLACEMENTS"
    log "saturation done"
fi

# 3. open loop at OPEN_RATE req/s, 60 ms upstream (oha -q, latency corrected); peak RSS
if want open; then
    for t in "${TGT[@]}"; do
        place_for "$t" d60
        oha_open "${URL[$t.d60]}" "$OPEN_RATE" "$OPEN_CONNS" "$OPEN_WARM" >/dev/null || true
        measure "\"test\":\"open\",\"target\":\"$t\"" "${PID[$t.d60]}" -- \
            oha_open "${URL[$t.d60]}" "$OPEN_RATE" "$OPEN_CONNS" "$OPEN_SECS" >/dev/null
        settle "${PID[$t.d60]}"
    done
    log "open loop done"
fi

# 4. streaming TTFT at c=1 from the paced upstream, interleaved rounds in each placement
if want ttft; then
    for t in "${TGT[@]}"; do place_for "$t" zero; gw_load "${URL[$t.zero]}" 1 1 1 >/dev/null || true; done
    interleaved ttft zero 1 "$TTFT_SECS" 1 "$TTFT_ROUNDS" "$LAT_PLACEMENTS"
    log "TTFT done"
fi

# 5. per-chunk cost: unpaced 34-frame streams, c=1 (added latency per frame) and c=CHUNK_CONNS (CPU)
if want chunk; then
    for t in "${TGT[@]}"; do
        place_for "$t" sse0
        measure "\"test\":\"chunk_c1\",\"target\":\"$t\"" "${PID[$t.sse0]}" -- \
            gw_load "${URL[$t.sse0]}" 1 "$TTFT_SECS" 1 >/dev/null
        measure "\"test\":\"chunk\",\"target\":\"$t\"" "${PID[$t.sse0]}" -- \
            gw_load "${URL[$t.sse0]}" "$CHUNK_CONNS" "$CHUNK_SECS" 1 >/dev/null
        settle "${PID[$t.sse0]}"
    done
    log "per-chunk done"
fi

# 6. memory with OPEN_STREAMS concurrent open streams (fresh servers; 6.4 s streams)
if want streams; then
    # LiteLLM takes minutes to start on a busy 2-core box, so it joins this step only with LITELLM_STREAMS=1.
    for t in "${TGT[@]}"; do
        [ "$t" = direct ] && continue
        [ "$t" = litellm ] && [ "${LITELLM_STREAMS:-0}" != 1 ] && { for m in zero d60 sse0; do stop_pid "${PID[$t.$m]}"; done; continue; }
        for m in zero d60 sse0; do stop_pid "${PID[$t.$m]}"; done # free memory and CPU
        start_target "$t" slow
        wait_target "$t" slow
        place_for "$t" slow
        gw_load "${URL[$t.slow]}" 4 2 1 >/dev/null || true
        sleep 1
        base=$(rss_kb "${PID[$t.slow]}")
        GRACE=60 measure "\"test\":\"streams\",\"target\":\"$t\",\"rss_base_kb\":$base" "${PID[$t.slow]}" -- \
            gw_load "${URL[$t.slow]}" "$OPEN_STREAMS" "$STREAMS_SECS" 1 >/dev/null
        stop_pid "${PID[$t.slow]}"
    done
    log "open streams done"
fi

python3 "$BENCH_DIR/report.py" "$RESULTS" --markdown "$OUT_DIR/report.md"
log "markdown table: $OUT_DIR/report.md"
