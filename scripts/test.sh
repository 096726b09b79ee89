#!/usr/bin/env bash
# The one test command: prepare the venv (setup.sh), make sure the system
# packages the tests use are present (chromium, postgresql), start a
# throw-away PostgreSQL (pg.sh) for the run, then run pytest offline.
#
#   bash scripts/test.sh                   # whole suite: -q -ra --durations=15
#   bash scripts/test.sh tests/unit -x     # any pytest arguments
#
# Exits with pytest's code; "no tests collected" (5) counts as a failure.
# Knobs: PGPT_VENV, PGPT_SKIP_SETUP=1, PGPT_SKIP_SYSTEM_PACKAGES=1, and
# PERSONAL_GPT_TEST_POSTGRES_URL (use that server instead of starting one).
# Unattended-safe (no prompts), works as root. Bash 3.2 compatible.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${PGPT_VENV:-$ROOT/.venv}"
step() { printf '==> %s\n' "$*"; }
warn() { printf 'test.sh: WARNING: %s\n' "$*" >&2; }

# pytest's exit code -> ours. 5 ("no tests collected") is a failure: a typo
# in a path or -k must never pass CI.
map_exit_code() {
    local rc="$1"
    if [ "$rc" = 5 ]; then
        printf 'test.sh: FAILED: pytest collected no tests (exit 5); check the paths and -k/-m arguments.\n' >&2
    fi
    return "$rc"
}

# shellcheck source=scripts/lib.sh
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

chromium_path() {
    local candidate
    for candidate in "${PGPT_CHROMIUM:-}" /usr/bin/chromium /usr/bin/chromium-browser \
        "/Applications/Chromium.app/Contents/MacOS/Chromium"; do
        if [ -n "$candidate" ] && [ -x "$candidate" ]; then
            echo "$candidate"
            return 0
        fi
    done
    return 1
}

ensure_system_packages() {
    local missing=""
    chromium_path >/dev/null || missing="$missing chromium"
    bash "$ROOT/scripts/pg.sh" bindir >/dev/null 2>&1 || missing="$missing postgresql"
    [ -n "$missing" ] || return 0
    if [ "$(uname -s)" = Darwin ]; then
        warn "missing:$missing. Install with:
    brew install --cask chromium   # then: export PGPT_CHROMIUM=/Applications/Chromium.app/Contents/MacOS/Chromium
    brew install postgresql@15
  Tests that need them will fail until then."
        return 0
    fi
    if command -v apt-get >/dev/null 2>&1; then
        step "Installing system packages:$missing (apt-get)"
        # shellcheck disable=SC2086
        if run_as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
            run_as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $missing >/dev/null; then
            return 0
        fi
        warn "could not install$missing (needs root or passwordless sudo): run  sudo apt-get install$missing"
    else
        warn "missing:$missing; install them with your package manager (Debian/Ubuntu: apt-get install$missing)"
    fi
    warn "tests that need$missing will fail."
}

main() {
    cd "$ROOT"
    if [ "${PGPT_SKIP_SETUP:-0}" != 1 ]; then
        # the suite tests both local backends: torch, and llama.cpp (PGPT_LLAMACPP=0 to leave it out)
        PGPT_LLAMACPP="${PGPT_LLAMACPP:-1}" bash "$ROOT/scripts/setup.sh" </dev/null
        # set up with llama.cpp: its tests must then run, not skip (tests/unit/test_llamacpp_backend.py)
        if [ "${PGPT_LLAMACPP:-1}" = 1 ]; then
            export PGPT_EXPECT_LLAMACPP=1
        fi
    fi
    if [ "${PGPT_SKIP_SYSTEM_PACKAGES:-0}" != 1 ]; then
        ensure_system_packages </dev/null
    fi

    if [ -z "${PERSONAL_GPT_TEST_POSTGRES_URL:-}" ]; then
        step "Starting a throw-away PostgreSQL"
        local exports
        if exports="$(bash "$ROOT/scripts/pg.sh" start </dev/null)"; then
            eval "$exports"
            # shellcheck disable=SC2064
            trap "bash '$ROOT/scripts/pg.sh' stop '$PGPT_PG_DIR'" EXIT
            trap 'exit 130' INT
            trap 'exit 143' TERM
        else
            warn "PostgreSQL did not start; tests that need it will fail."
        fi
    fi

    export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
    export PGPT_VENV="$VENV"
    if [ "$#" -eq 0 ]; then
        set -- -q -ra --durations=15
    fi
    step "Running pytest $*"
    local rc=0
    "$VENV/bin/python" -m pytest "$@" </dev/null || rc=$?
    map_exit_code "$rc"
}

# Sourcing this file (tests do) defines the functions without running.
if [ "${BASH_SOURCE[0]}" = "$0" ]; then
    main "$@"
fi
