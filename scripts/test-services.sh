# Sourced by `make test` (bash): starts the services the test suite needs and exports their URLs.
# Each runs from Debian's packages on a free loopback port in a temp dir, and is stopped when the
# recipe's shell exits. With CI set, a missing service is an error, not a skip.
#
#   TOLLGATE_TEST_PG_URL      PostgreSQL (scripts/pg-test.sh): billing suite, multi-instance limits
#   TOLLGATE_TEST_REDIS_URL   redis-server: shared Redis for tests that need one. The limiter's own
#                             Redis tests (tests/limits_cluster.rs) start private redis-server
#                             processes because they kill and restart Redis mid-test.

_tg_cleanup() {
    if [ -n "${TOLLGATE_TEST_PG_DIR:-}" ]; then scripts/pg-test.sh stop "$TOLLGATE_TEST_PG_DIR" || true; fi
    if [ -n "${_tg_redis_dir:-}" ]; then
        if [ -f "$_tg_redis_dir/redis.pid" ]; then kill "$(cat "$_tg_redis_dir/redis.pid")" 2>/dev/null || true; fi
        rm -rf "$_tg_redis_dir"
    fi
}
trap _tg_cleanup EXIT

if [ -x scripts/pg-test.sh ] && [ -z "${TOLLGATE_TEST_PG_URL:-}" ]; then
    if pg_env="$(scripts/pg-test.sh start)"; then
        eval "$pg_env"
    else
        echo "test-services: could not start PostgreSQL for the tests" >&2
    fi
fi

if command -v redis-server >/dev/null 2>&1; then
    _tg_redis_dir="$(mktemp -d)"
    _tg_redis_port="$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()')"
    redis-server --port "$_tg_redis_port" --bind 127.0.0.1 --save '' --appendonly no \
        --dir "$_tg_redis_dir" --daemonize yes --pidfile "$_tg_redis_dir/redis.pid" \
        --logfile "$_tg_redis_dir/redis.log" >/dev/null
    for _ in $(seq 1 100); do
        if redis-cli -p "$_tg_redis_port" ping >/dev/null 2>&1; then break; fi
        sleep 0.05
    done
    export TOLLGATE_TEST_REDIS_URL="redis://127.0.0.1:$_tg_redis_port/"
elif [ -n "${CI:-}" ]; then
    echo "test-services: redis-server is not installed (make deps-test installs it)" >&2
else
    echo "test-services: redis-server not installed; Redis tests will be skipped" >&2
fi
