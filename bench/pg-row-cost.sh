#!/usr/bin/env bash
# What a request's record costs PostgreSQL: as a row of its own (as lease admission wrote it until
# migration 0009), part by part, and packed (`request_pieces`, as it writes it now).
#
# The lease slot of bench/billing.sh (the real gateway, billing on with lease admission, through
# the fake upstream) fills a throwaway PostgreSQL's `request_pieces` table. The pieces are copied
# out in COPY's binary format, one file each, and copied in again, one transaction per piece (the
# writer's transaction holds one or two), into tables like `request_pieces` with its `data`
# stored as migrated (out of line, uncompressed) or compressed (pglz, lz4). The same records,
# listed by `tollgate requests`, are also put in the `requests` table as rows (the lease id added
# back: the listing leaves it out), copied out in batches of 2,048 (the writer's batches at full
# load were ~2,000 rows) and copied in again, one transaction per batch as the writer did, into
# tables that each differ from `requests` in one thing: no secondary index, no check
# constraints, no primary key, only some of the columns. For each table, the server backend's
# CPU time per record (from /proc/PID/schedstat, in nanoseconds) is printed, median of ROUNDS
# interleaved rounds. Nothing else runs meanwhile, so these are idle-machine costs; beside the
# gateway and the load generator (bench/billing.sh) the same records cost more.
#
#   bench/pg-row-cost.sh [rounds]          # default 3
#   PROFILE=dev bench/pg-row-cost.sh ...    # a debug build fills the table instead
set -euo pipefail
cd "$(dirname "$0")/.."
for v in $(scripts/ggml-cpu-flags.sh); do export "${v?}"; done # llama.cpp build options as `make` sets them
rounds="${1:-3}"
if [ "${PROFILE:-release}" = "release" ]; then
    cargo build --release --bin tollgate --example billing_bench
    dir=target/release
else
    cargo build --bin tollgate --example billing_bench
    dir=target/debug
fi
pg=$(scripts/pg-test.sh start) # a failed start stops here (set -e), not at the first use
eval "$pg"
tmp=$(mktemp -d)
trap 'scripts/pg-test.sh stop "$TOLLGATE_TEST_PG_DIR"; rm -rf "$tmp"' EXIT
# The server reads and writes the batch files itself (COPY … FILE), as its own user.
rows="$TOLLGATE_TEST_PG_DIR/rows"
mkdir -p "$rows"
chmod 777 "$rows"
psql_() { psql -X -q -v ON_ERROR_STOP=1 "$TOLLGATE_TEST_PG_URL" "$@"; }

lock=()
if [ -d /work/notes ]; then lock=(flock /work/notes/bench.lock); fi
echo "commit $(git rev-parse --short HEAD)$(git diff --quiet || echo '+dirty'), $(nproc) CPUs, $(date -u +%FT%TZ), $(psql_ -Atc 'SHOW server_version')"
echo "load average before: $(cut -d' ' -f1-3 /proc/loadavg)"
"${lock[@]}" "$dir/examples/billing_bench" --bin "$dir/tollgate" --secs 10 --rounds 1 --concurrency 8 \
    --delay-ms 0 --lease-pg "$TOLLGATE_TEST_PG_URL" >"$tmp/fill.out" 2>&1 \
    || { cat "$tmp/fill.out" >&2; exit 1; }
pieces=$(psql_ -Atc "SELECT count(*) FROM request_pieces")
records=$(psql_ -Atc "SELECT COALESCE(sum(rows), 0) FROM request_pieces")
if [ "$records" -lt 40960 ]; then
    echo "only $records request records were written; need 40,960" >&2
    exit 1
fi
for i in $(seq 0 $((pieces - 1))); do
    echo "COPY (SELECT * FROM request_pieces ORDER BY id OFFSET $i LIMIT 1) TO '$rows/piece-$i.bin' (FORMAT binary);"
done | psql_ >/dev/null

# The records as rows of `requests`.
TOLLGATE_SECRET=pg-row-cost-bench-secret-0123456789abcdef "$dir/tollgate" requests --database-url "$TOLLGATE_TEST_PG_URL" \
    --from 0 --limit 100000000 >"$rows/records.jsonl"
psql_ <<SQL
CREATE TABLE jl (j jsonb);
\copy jl FROM '$rows/records.jsonl' (FORMAT csv, QUOTE e'\x01', DELIMITER e'\x02')
CREATE TYPE rr AS (id text, account_id text, key_id text, model text, provider text,
    upstream_model text, price_id bigint, state text, hold_micros bigint, hold_expires_at bigint,
    status text, http_status bigint, prompt_tokens bigint, cached_tokens bigint,
    completion_tokens bigint, reasoning_tokens bigint, cost_micros bigint,
    computed_cost_micros bigint, input_cost_micros bigint, cached_cost_micros bigint,
    output_cost_micros bigint, network_cost_micros bigint, platform_fee_micros bigint,
    estimated boolean, delivered boolean, latency_ms bigint, created_at bigint,
    finished_at bigint);
INSERT INTO requests (id, lease_id, account_id, key_id, key_reserved, model, provider,
    upstream_model, price_id, state, hold_micros, hold_expires_at, status, http_status,
    prompt_tokens, cached_tokens, completion_tokens, reasoning_tokens, cost_micros,
    computed_cost_micros, input_cost_micros, cached_cost_micros, output_cost_micros,
    network_cost_micros, platform_fee_micros, estimated, delivered, latency_ms, created_at,
    finished_at)
SELECT r.id, (SELECT min(id) FROM credit_leases), r.account_id, r.key_id, 0, r.model,
    r.provider, r.upstream_model, r.price_id, r.state, r.hold_micros, r.hold_expires_at,
    r.status, r.http_status, r.prompt_tokens, r.cached_tokens, r.completion_tokens,
    r.reasoning_tokens, r.cost_micros, r.computed_cost_micros, r.input_cost_micros,
    r.cached_cost_micros, r.output_cost_micros, r.network_cost_micros, r.platform_fee_micros,
    r.estimated::int, r.delivered::int, r.latency_ms, r.created_at, r.finished_at
FROM jl, jsonb_populate_record(NULL::rr, jl.j) AS r;
DROP TABLE jl;
DROP TYPE rr;
SQL
n=$(psql_ -Atc "SELECT count(*) FROM requests")
if [ "$n" != "$records" ]; then
    echo "$n rows from $records records" >&2
    exit 1
fi
batches=$((n / 2048))
if [ "$batches" -gt 100 ]; then batches=100; fi
total=$((batches * 2048))

# Column lists by type, in table order.
cols_of() {
    psql_ -Atc "SELECT string_agg(column_name, ', ' ORDER BY ordinal_position)
        FROM information_schema.columns WHERE table_name = 'requests' AND data_type = '$1'"
}
text_cols=$(cols_of text)
int_cols=$(cols_of bigint)
all_cols=$(psql_ -Atc "SELECT count(*) FROM information_schema.columns WHERE table_name = 'requests'")

# The batches, in id order (the writer's rows arrive nearly in id order: ids are UUIDv7).
for i in $(seq 0 $((batches - 1))); do
    for set in all:'*' text:"$text_cols" int:"$int_cols" id:id; do
        psql_ -c "COPY (SELECT ${set#*:} FROM requests ORDER BY id OFFSET $((i * 2048)) LIMIT 2048)
            TO '$rows/${set%%:*}-$i.bin' (FORMAT binary)"
    done
done

# name|files|what it has|DDL ("piece" files: one transaction per piece, counted per record)
variants=(
    "request_pieces as migrated|piece|pieces, data out of line uncompressed (STORAGE EXTERNAL), index by bucket|CREATE TABLE v (LIKE request_pieces INCLUDING ALL)"
    "pieces, pglz|piece|pieces, data compressed by pglz (PostgreSQL's default)|CREATE TABLE v (LIKE request_pieces INCLUDING ALL); ALTER TABLE v ALTER COLUMN data SET STORAGE EXTENDED"
    "pieces, lz4|piece|pieces, data compressed by lz4|CREATE TABLE v (LIKE request_pieces INCLUDING ALL); ALTER TABLE v ALTER COLUMN data SET STORAGE EXTENDED, ALTER COLUMN data SET COMPRESSION lz4"
    "as migrated|all|every column, primary key, partial index of open holds, check constraints|CREATE TABLE v (LIKE requests INCLUDING ALL)"
    "no partial index|all|every column, primary key, check constraints|CREATE TABLE v (LIKE requests INCLUDING DEFAULTS INCLUDING CONSTRAINTS); ALTER TABLE v ADD PRIMARY KEY (id)"
    "no checks|all|every column, primary key, partial index|CREATE TABLE v (LIKE requests INCLUDING DEFAULTS); ALTER TABLE v ADD PRIMARY KEY (id); CREATE INDEX ON v (hold_expires_at) WHERE state = 'held'"
    "primary key only|all|every column, primary key|CREATE TABLE v (LIKE requests INCLUDING DEFAULTS); ALTER TABLE v ADD PRIMARY KEY (id)"
    "heap only|all|every column ($all_cols), no index, no constraint|CREATE TABLE v (LIKE requests INCLUDING DEFAULTS)"
    "text columns|text|the $(echo "$text_cols" | tr ',' '\n' | wc -l) TEXT columns, no index|CREATE TABLE v AS SELECT $text_cols FROM requests LIMIT 0"
    "integer columns|int|the $(echo "$int_cols" | tr ',' '\n' | wc -l) BIGINT columns, no index|CREATE TABLE v AS SELECT $int_cols FROM requests LIMIT 0"
    "id only|id|the id column, no index|CREATE TABLE v AS SELECT id FROM requests LIMIT 0"
    "id and its primary key|id|the id column, primary key|CREATE TABLE v AS SELECT id FROM requests LIMIT 0; ALTER TABLE v ADD PRIMARY KEY (id)"
)

# Backend CPU nanoseconds spent copying every batch into a fresh table made by DDL.
measure() { # files ddl
    local script="$tmp/copy.sql"
    {
        echo "DROP TABLE IF EXISTS v; $2;"
        echo "CHECKPOINT;"
        echo "SELECT pg_backend_pid() AS pid \\gset"
        echo "\\setenv PGPID :pid"
        echo "\\! cut -d' ' -f1 /proc/\$PGPID/schedstat > $tmp/before"
        local files=$batches
        if [ "$1" = piece ]; then files=$pieces; fi
        for i in $(seq 0 $((files - 1))); do
            echo "BEGIN; COPY v FROM '$rows/$1-$i.bin' (FORMAT binary); COMMIT;"
        done
        echo "\\! cut -d' ' -f1 /proc/\$PGPID/schedstat > $tmp/after"
    } >"$script"
    "${lock[@]}" psql -X -q -v ON_ERROR_STOP=1 "$TOLLGATE_TEST_PG_URL" -f "$script" >/dev/null
    echo $(($(cat "$tmp/after") - $(cat "$tmp/before")))
}

declare -A cpu_ns
for _ in $(seq "$rounds"); do
    for k in "${!variants[@]}"; do
        IFS='|' read -r _ files _ ddl <<<"${variants[$k]}"
        cpu_ns[$k]="${cpu_ns[$k]:-} $(measure "$files" "$ddl")"
    done
done
echo "load average after: $(cut -d' ' -f1-3 /proc/loadavg)"
echo
echo "$records records in $pieces pieces (a COPY of one piece per transaction); $total of them as rows"
echo "($batches COPYs of 2,048, binary); $rounds rounds; backend CPU per record:"
echo
echo "| table | what it has | µs per record (median) | rounds |"
echo "|---|---|---|---|"
for k in "${!variants[@]}"; do
    IFS='|' read -r name files what _ <<<"${variants[$k]}"
    per=$total
    if [ "$files" = piece ]; then per=$records; fi
    python3 - "$name" "$what" "$per" "${cpu_ns[$k]}" <<'PY'
import statistics, sys
name, what, rows = sys.argv[1], sys.argv[2], int(sys.argv[3])
us = [int(ns) / 1000 / rows for ns in sys.argv[4].split()]
print(f"| {name} | {what} | {statistics.median(us):.2f} | {' / '.join(f'{u:.2f}' for u in us)} |")
PY
done
