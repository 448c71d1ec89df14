#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL started (scripts/pg-test.sh) and
# TOLLGATE_TEST_PG_URL exported; stops it afterwards. Usage: scripts/with-pg.sh cargo test
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
eval "$("$here/pg-test.sh" start)"
trap '"$here/pg-test.sh" stop "$TOLLGATE_TEST_PG_DIR"' EXIT
"$@"
