#!/usr/bin/env bash
# Starts/stops a throwaway PostgreSQL for tollgate's tests (loopback only, temp dir, non-root user).
#
#   eval "$(scripts/pg-test.sh start)"   # prints `export TOLLGATE_TEST_PG_URL=...; export TOLLGATE_TEST_PG_DIR=...`
#   scripts/pg-test.sh stop              # stops the server started above and removes its directory
#
# Needs Debian's `postgresql` package (`apt-get install -y postgresql`); initdb/pg_ctl are taken from
# /usr/lib/postgresql/*/bin. When run as root the cluster runs as the `postgres` user.
set -euo pipefail

PG_BIN=""
for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then PG_BIN="$d"; fi
done
if [ -z "$PG_BIN" ]; then
    echo "pg-test.sh: no PostgreSQL found under /usr/lib/postgresql (apt-get install -y postgresql)" >&2
    exit 1
fi

as_pg() {
    if [ "$(id -u)" = "0" ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

cmd="${1:-start}"
case "$cmd" in
start)
    port="${TOLLGATE_TEST_PG_PORT:-}"
    if [ -z "$port" ]; then
        port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])' 2>/dev/null || echo 55432)
    fi
    dir=$(mktemp -d /tmp/tollgate-pg.XXXXXX)
    chmod 755 "$dir"
    if [ "$(id -u)" = "0" ]; then chown postgres "$dir"; fi
    as_pg "$PG_BIN/initdb" -D "$dir/data" -U tollgate --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $dir -c fsync=off -c max_connections=300" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_pg "$PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U tollgate tollgate_test >/dev/null
    echo "export TOLLGATE_TEST_PG_URL=postgres://tollgate@127.0.0.1:$port/tollgate_test"
    echo "export TOLLGATE_TEST_PG_DIR=$dir"
    ;;
stop)
    dir="${2:-${TOLLGATE_TEST_PG_DIR:-}}"
    if [ -z "$dir" ] || [ ! -d "$dir/data" ]; then
        echo "pg-test.sh stop: no TOLLGATE_TEST_PG_DIR" >&2
        exit 0
    fi
    as_pg "$PG_BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    rm -rf "$dir"
    ;;
*)
    echo "usage: $0 start|stop [dir]" >&2
    exit 2
    ;;
esac
