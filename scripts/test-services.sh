# Sourced by `make test` (bash): starts the services the test suite needs and exports their URLs.
# PostgreSQL: a throwaway cluster on a loopback port (scripts/pg-test.sh), stopped when the
# recipe's shell exits; exports TOLLGATE_TEST_PG_URL (tests fail loudly under CI without it).
if [ -x scripts/pg-test.sh ]; then
    if pg_env="$(scripts/pg-test.sh start)"; then
        eval "$pg_env"
        trap 'scripts/pg-test.sh stop "$TOLLGATE_TEST_PG_DIR"' EXIT
    else
        echo "test-services: could not start PostgreSQL for the tests" >&2
    fi
fi
