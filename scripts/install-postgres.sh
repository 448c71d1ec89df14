#!/usr/bin/env bash
# Installs PostgreSQL from Debian's packages for the test suite, if it is not there yet.
set -euo pipefail
if ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1; then
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq postgresql >/dev/null
# Debian starts a cluster on install in some environments; tests use their own, so stop it.
if command -v pg_ctlcluster >/dev/null 2>&1; then
    for v in /usr/lib/postgresql/*; do
        pg_ctlcluster "$(basename "$v")" main stop >/dev/null 2>&1 || true
    done
fi
