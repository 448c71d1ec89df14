#!/usr/bin/env bash
# `make run`'s first start: auth is required (the built-in config too), so a fresh store needs an
# account and a key before any request. When the store has no key yet, this creates the account
# `local` (if missing) and a customer key for it, through tollgate's own CLI, and prints the key:
# once, here, as `tollgate keys create` does; the store keeps only its HMAC. Later runs find a key
# and print nothing.
#
#   scripts/first-key.sh COMMAND...   # COMMAND runs tollgate, e.g. `cargo run -q --`
set -euo pipefail
if [ $# -eq 0 ]; then
    echo "usage: $0 COMMAND... (the command that runs tollgate)" >&2
    exit 2
fi
tg=("$@")

# `keys list` prints a header line, then one line per key (revoked ones included). Read into a
# variable first, so that a failing command stops the script instead of reading as "no keys".
keys=$("${tg[@]}" keys list)
if [ "$(printf '%s\n' "$keys" | awk 'NR > 1 && NF' | wc -l)" -gt 0 ]; then
    exit 0
fi
# (awk reads to the end: `grep -q` could exit first and, under pipefail, fail the pipeline.)
if ! "${tg[@]}" accounts list | awk -F'\t' 'NR > 1 && $1 == "local" { found = 1 } END { exit !found }'; then
    "${tg[@]}" accounts create local >/dev/null
fi
key=$("${tg[@]}" keys create --account local)
cat <<EOF

  First start: created the account "local" and an API key for it. This is the only time the key
  is shown (tollgate stores only its HMAC); the embedded model is free, so no credit is needed.

      $key

  curl -s http://127.0.0.1:8080/v1/chat/completions -H 'authorization: Bearer $key' \\
    -H 'content-type: application/json' \\
    -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Say hello"}]}'

  Another key: target/debug/tollgate keys create --account local

EOF
