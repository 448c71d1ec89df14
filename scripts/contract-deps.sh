#!/usr/bin/env bash
# Installs the SDKs the contract tests drive: the `openai` and `pytest` Python packages into the
# project-local venv `.venv/`, and the `openai` npm package into `tests/contract/node_modules/`.
# Idempotent; safe to run from `make deps` and `.ci/run`.
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
contract="$root/tests/contract"

if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
fi
"$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$contract/requirements.txt"

if [ -f "$contract/package-lock.json" ]; then
    (cd "$contract" && npm ci --no-audit --no-fund --loglevel=error)
else
    (cd "$contract" && npm install --no-audit --no-fund --loglevel=error)
fi

"$venv/bin/python" -c 'import openai, pytest; print("contract deps: python openai", openai.__version__, "pytest", pytest.__version__)'
echo "contract deps: npm openai $(node -p 'require(process.argv[1]).version' "$contract/node_modules/openai/package.json")"
