#!/usr/bin/env bash
# Profile-guided release build of tollgate (`make release-pgo`): the release profile (fat LTO, one
# codegen unit) built twice. Stage 1 is instrumented (-Cprofile-generate) and serves a training
# workload on loopback: the bench-floor fake upstream (`gwbench mock`, bench/lib.sh) and its
# load generator, chat completions complete and streamed at 1 and 16-32 connections, the
# Anthropic Messages and Responses APIs, and the usual refusals (bad JSON, invalid parameter,
# unknown model, unknown path, unreachable upstream). Stage 2 is rebuilt with that profile
# (-Cprofile-use), so LLVM lays out and inlines the request path for the way it really runs.
#
#   scripts/pgo-build.sh        # -> target/pgo/tollgate (~20 min on 2 cores from scratch)
#   knobs: PGO_DIR=target/pgo (stage 2 and the training run's files), PGO_SECS=4 (length of
#   each load step), PGO_PROFILES=target/pgo-data (raw and merged profiles)
#
# Both stages build with --target set to the host, so the flags reach tollgate and its
# dependencies but not build scripts or proc macros (their runs would add profiles of their own);
# their target dirs (target/pgo-gen, target/pgo) leave target/release alone. Needs llvm-profdata
# of the toolchain's LLVM version: rustup's llvm-tools component (installed here if missing).
# Loopback only; every load step is bounded in time.
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
PGO_DIR=${PGO_DIR:-$ROOT/target/pgo}
PGO_SECS=${PGO_SECS:-4}
case $PGO_DIR in /*) ;; *) PGO_DIR=$ROOT/$PGO_DIR ;; esac
GEN_DIR=$ROOT/target/pgo-gen
PROFILES=${PGO_PROFILES:-$ROOT/target/pgo-data}
case $PROFILES in /*) ;; *) PROFILES=$ROOT/$PROFILES ;; esac
HOST_TRIPLE=$(rustc -vV | sed -n 's/^host: //p')

# The training run's files (configs, server logs) go to $PGO_DIR/train; ordinary scheduling, no
# pinning; ports away from the benches' defaults.
export OUT_DIR=$PGO_DIR/train PLACEMENT=unpinned-cfs PORT_BASE=${PGO_PORT_BASE:-19500}
rm -rf "$OUT_DIR"
. "$ROOT/bench/lib.sh" # ggml flags, gwbench, start/stop, open_config, gw_load; cleanup on exit

profdata() {
    local bin
    bin="$(rustc --print sysroot)/lib/rustlib/$HOST_TRIPLE/bin/llvm-profdata"
    if [ ! -x "$bin" ]; then
        log "installing rustup's llvm-tools (llvm-profdata)"
        rustup component add llvm-tools-preview >&2 || rustup component add llvm-tools >&2
    fi
    [ -x "$bin" ] || die "no llvm-profdata at $bin"
    echo "$bin"
}
PROFDATA=$(profdata)
ensure_gwbench

# ---------------------------------------------------------------- stage 1: instrumented build
log "stage 1: instrumented release build into $GEN_DIR"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-generate=$PROFILES/raw" cargo build --release --quiet \
    --bin tollgate --target "$HOST_TRIPLE" --target-dir "$GEN_DIR")
GEN_BIN=$GEN_DIR/$HOST_TRIPLE/release/tollgate
rm -rf "$PROFILES/raw" && mkdir -p "$PROFILES/raw"

# ---------------------------------------------------------------- training workload
mport=$((PORT_BASE + 1))
tport=$((PORT_BASE + 2))
dead=$((PORT_BASE + 3)) # nothing listens there: the unreachable-upstream path
THREADS=1 start mock "$GWBENCH" mock "$HOST:$mport" 0 32 0
open_config "$OUT_DIR/train.toml" "$tport" "$mport"
cat >>"$OUT_DIR/train.toml" <<TOML
[[providers]]
name = "down"
base_url = "http://$HOST:$dead/v1"
dialect = "openai"
[[models]]
id = "down-model"
  [[models.routes]]
  provider = "down"
TOML
start tollgate "$GEN_BIN" serve --config "$OUT_DIR/train.toml"
tg=$LAST_PID
wait_http "http://$HOST:$tport/healthz" 30 || die "the instrumented tollgate did not start"
base=http://$HOST:$tport
train() { # PATH CONNS STREAM
    log "training: $1 c=$2 stream=$3"
    gw_load "$base$1" "$2" "$PGO_SECS" "$3" >>"$OUT_DIR/train-load.jsonl"
}
train /v1/chat/completions 1 0
train /v1/chat/completions 32 0
train /v1/chat/completions 1 1
train /v1/chat/completions 16 1
train /v1/messages 1 0
train /v1/messages 1 1
log "training: Responses API, model listing, metrics and refusals"
python3 - "$HOST" "$tport" <<'PY'
import http.client, json, sys
host, port = sys.argv[1], int(sys.argv[2])
conn = http.client.HTTPConnection(host, port, timeout=10)
def call(method, path, body=None, n=1):
    for _ in range(n):
        data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
        conn.request(method, path, body=data, headers={"content-type": "application/json"})
        conn.getresponse().read()
user = [{"role": "user", "content": "Return one short sentence about latency."}]
call("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "Say hi", "max_output_tokens": 16}, 300)
call("POST", "/v1/responses", {"model": "gpt-4o-mini", "input": "Say hi", "stream": True}, 200)
call("POST", "/v1/messages/count_tokens", {"model": "gpt-4o-mini", "messages": user}, 50)
call("GET", "/v1/models", None, 50)
call("GET", "/v1/models/gpt-4o-mini", None, 50)
call("GET", "/metrics", None, 20)
call("GET", "/healthz", None, 20)
call("GET", "/readyz", None, 20)
call("POST", "/v1/chat/completions", b'{"model": "gpt-4o-mini", "messages": [', 100)
call("POST", "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": user, "temperature": 7}, 100)
call("POST", "/v1/chat/completions", {"model": "gpt-4o-mni", "messages": user}, 100)
call("POST", "/v1/chat/completions", {"model": "down-model", "messages": user}, 20)
call("GET", "/v1/nothing-here", None, 50)
PY
stop_pid "$tg" # SIGTERM: a clean exit writes the profile
ls "$PROFILES"/raw/*.profraw >/dev/null 2>&1 || die "the instrumented run left no .profraw in $PROFILES/raw"
"$PROFDATA" merge -o "$PROFILES/merged.profdata" "$PROFILES"/raw/*.profraw
# Named by its content: cargo tracks RUSTFLAGS, not the file they name, so a new profile must
# change the flag to rebuild stage 2.
PROFILE=$PROFILES/tollgate-$(sha256sum "$PROFILES/merged.profdata" | cut -c1-12).profdata
mv "$PROFILES/merged.profdata" "$PROFILE"
log "profile: $PROFILE ($(du -h "$PROFILE" | cut -f1))"

# ---------------------------------------------------------------- stage 2: optimised build
log "stage 2: release build with the profile into $PGO_DIR"
(cd "$ROOT" && RUSTFLAGS="-Cprofile-use=$PROFILE" cargo build --release --quiet \
    --bin tollgate --target "$HOST_TRIPLE" --target-dir "$PGO_DIR")
cp "$PGO_DIR/$HOST_TRIPLE/release/tollgate" "$PGO_DIR/tollgate"
log "built $PGO_DIR/tollgate"
