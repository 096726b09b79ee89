#!/usr/bin/env bash
# Start Personal GPTs on this machine: prepare the venv (setup.sh), then run
# the app at http://localhost:8501 (pass `--port N` or other `serve` args).
#   bash scripts/start.sh [serve args...]
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PGPT_VENV:-$ROOT/.venv}"
bash "$ROOT/scripts/setup.sh"
cd "$ROOT"
exec "$VENV/bin/personal-gpt" serve "$@"
