#!/usr/bin/env bash
# Sourced by `make test` before `cargo test`: starts the services integration tests share and
# exports where they are. Each service runs from Debian's packages on a free loopback port in a
# temp dir, without persistence, and is stopped when the sourcing shell exits.
#
# Exports:
#   TOLLGATE_TEST_REDIS_URL   redis://127.0.0.1:PORT/  (redis-server from `apt-get install redis-server`)
#
# The limiter's own Redis tests (tests/limits_cluster.rs) start private redis-server processes,
# because they kill and restart Redis mid-test; they need only the `redis-server` binary.
# With CI set, a missing redis-server is an error, not a skip.

_tg_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'
}

if command -v redis-server >/dev/null 2>&1; then
    _tg_redis_dir="$(mktemp -d)"
    _tg_redis_port="$(_tg_free_port)"
    redis-server --port "$_tg_redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$_tg_redis_dir" --daemonize yes --pidfile "$_tg_redis_dir/redis.pid" \
        --logfile "$_tg_redis_dir/redis.log" >/dev/null
    for _ in $(seq 1 100); do
        if redis-cli -p "$_tg_redis_port" ping >/dev/null 2>&1; then break; fi
        sleep 0.05
    done
    export TOLLGATE_TEST_REDIS_URL="redis://127.0.0.1:$_tg_redis_port/"
    _tg_stop_redis() {
        if [ -f "$_tg_redis_dir/redis.pid" ]; then kill "$(cat "$_tg_redis_dir/redis.pid")" 2>/dev/null || true; fi
        rm -rf "$_tg_redis_dir"
    }
    trap _tg_stop_redis EXIT
    echo "test-services: redis on $TOLLGATE_TEST_REDIS_URL"
elif [ -n "${CI:-}" ]; then
    echo "test-services: redis-server is not installed (make deps-test installs it)" >&2
    return 1 2>/dev/null || exit 1
else
    echo "test-services: redis-server not installed; Redis tests will be skipped" >&2
fi

# PostgreSQL for the billing suite and the multi-instance limiter test (scripts/pg-test.sh, from
# the billing branch), unless the caller already provides one.
if [ -z "${TOLLGATE_TEST_PG_URL:-}" ] && [ -x scripts/pg-test.sh ]; then
    if eval "$(scripts/pg-test.sh start)"; then
        _tg_stop_pg() { scripts/pg-test.sh stop "$TOLLGATE_TEST_PG_DIR" || true; }
        trap '_tg_stop_pg; if declare -f _tg_stop_redis >/dev/null; then _tg_stop_redis; fi' EXIT
        echo "test-services: postgres on $TOLLGATE_TEST_PG_URL"
    elif [ -n "${CI:-}" ]; then
        echo "test-services: could not start PostgreSQL" >&2
        return 1 2>/dev/null || exit 1
    fi
fi
