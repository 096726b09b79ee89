#!/usr/bin/env bash
# A throw-away PostgreSQL server for tests, on 127.0.0.1 only, trust auth,
# with a database `personal_gpt_test`. Nothing here touches a system cluster.
#
#   eval "$(bash scripts/pg.sh start)"   # prints export lines (URL, PGPT_PG_DIR)
#   bash scripts/pg.sh stop [DIR]        # DIR: $PGPT_PG_DIR, else the last start
#   bash scripts/pg.sh bindir            # where initdb/pg_ctl were found
#
# As root the cluster runs as the `postgres` user (initdb refuses root).
# Knobs: PGPT_PG_BIN (directory holding initdb/pg_ctl), PGPT_PG_BASE (parent
# of the temp dir; default /tmp as root, else $TMPDIR or /tmp).
# Bash 3.2 compatible (macOS).
set -euo pipefail

DB_NAME="personal_gpt_test"
DB_USER="postgres"
log() { printf 'pg.sh: %s\n' "$*" >&2; }
die() { printf 'pg.sh: ERROR: %s\n' "$*" >&2; exit 1; }

# Remembers the last cluster started by this user, for a bare `pg.sh stop`.
LAST_FILE="${TMPDIR:-/tmp}"
LAST_FILE="${LAST_FILE%/}/pgpt-pg-last-$(id -u)"

find_bindir() {
    local dir found=""
    if [ -n "${PGPT_PG_BIN:-}" ]; then
        [ -x "$PGPT_PG_BIN/initdb" ] || die "PGPT_PG_BIN=$PGPT_PG_BIN has no initdb"
        echo "$PGPT_PG_BIN"
        return 0
    fi
    # Debian/Ubuntu keep the server binaries off PATH; Homebrew keeps
    # versioned ones under opt/. Glob order puts the newest major last.
    for dir in /usr/lib/postgresql/*/bin /opt/homebrew/opt/postgresql@*/bin \
        /usr/local/opt/postgresql@*/bin /usr/pgsql-*/bin \
        /Applications/Postgres.app/Contents/Versions/latest/bin; do
        if [ -x "$dir/initdb" ] && [ -x "$dir/pg_ctl" ]; then
            found="$dir"
        fi
    done
    if [ -z "$found" ] && command -v initdb >/dev/null 2>&1; then
        found="$(dirname "$(command -v initdb)")"
    fi
    [ -n "$found" ] || return 1
    echo "$found"
}

free_port() {
    local port
    if command -v python3 >/dev/null 2>&1; then
        python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
        return 0
    fi
    while :; do
        port=$((20000 + RANDOM % 40000))
        if ! (echo >"/dev/tcp/127.0.0.1/$port") >/dev/null 2>&1; then
            echo "$port"
            return 0
        fi
    done
}

# Run a server binary as the cluster owner.
as_owner() {
    if [ "$(id -u)" = 0 ]; then
        if command -v runuser >/dev/null 2>&1; then
            runuser -u postgres -- "$@"
        else
            sudo -u postgres -- "$@"
        fi
    else
        "$@"
    fi
}

cmd_start() {
    local base port url attempt pid
    # bindir, dir, data stay global: the EXIT trap below reads them.
    bindir="$(find_bindir)" || die "PostgreSQL server binaries (initdb, pg_ctl) not found.
  Debian/Ubuntu: apt-get install postgresql    macOS: brew install postgresql@15
  Or set PGPT_PG_BIN to the directory holding initdb."
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || die "running as root needs a 'postgres' user to own the cluster (apt-get install postgresql creates it)"
        base="${PGPT_PG_BASE:-/tmp}"
    else
        base="${PGPT_PG_BASE:-${TMPDIR:-/tmp}}"
    fi
    dir="$(mktemp -d "${base%/}/pgpt-pg.XXXXXX")"
    data="$dir/data"
    # On any failure below, leave nothing behind.
    trap 'as_owner "$bindir/pg_ctl" -D "$data" -m immediate stop >/dev/null 2>&1 || true; rm -rf "$dir"' EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    if [ "$(id -u)" = 0 ]; then
        chown postgres "$dir"
    fi
    as_owner "$bindir/initdb" -D "$data" -U "$DB_USER" -A trust -E UTF8 --locale=C --no-sync \
        >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; die "initdb failed"; }
    # Only loopback TCP and the private socket dir, trust auth; no durability.
    printf '%s\n' \
        "local all all trust" \
        "host all all 127.0.0.1/32 trust" >"$data/pg_hba.conf"
    for attempt in 1 2 3 4 5; do
        port="$(free_port)"
        printf '%s\n' \
            "listen_addresses = '127.0.0.1'" \
            "port = $port" \
            "unix_socket_directories = '$dir'" \
            "fsync = off" \
            "synchronous_commit = off" \
            "full_page_writes = off" \
            "max_connections = 200" >"$data/postgresql.auto.conf"
        if as_owner "$bindir/pg_ctl" -D "$data" -l "$dir/server.log" -w -t 60 start >/dev/null 2>&1; then
            break
        fi
        log "start on port $port failed (attempt $attempt)"
        port=""
    done
    [ -n "$port" ] || { tail -n 20 "$dir/server.log" >&2 || true; die "could not start PostgreSQL"; }
    "$bindir/createdb" -h 127.0.0.1 -p "$port" -U "$DB_USER" "$DB_NAME" ||
        die "createdb $DB_NAME failed"
    pid="$(head -n 1 "$data/postmaster.pid")"
    url="postgresql+psycopg://$DB_USER@127.0.0.1:$port/$DB_NAME"
    printf '%s\n' "BINDIR=$bindir" "DATA=$data" "PID=$pid" "PORT=$port" "URL=$url" >"$dir/state"
    echo "$dir" >"$LAST_FILE"
    trap - EXIT INT TERM
    log "PostgreSQL $("$bindir/pg_ctl" --version | awk '{print $3}') on 127.0.0.1:$port (pid $pid, dir $dir)"
    echo "export PERSONAL_GPT_TEST_POSTGRES_URL='$url'"
    echo "export PGPT_PG_DIR='$dir'"
}

state_get() { # state_get FILE KEY
    sed -n "s/^$2=//p" "$1" | head -n 1
}

cmd_stop() {
    local dir="${1:-${PGPT_PG_DIR:-}}" bindir data pid
    if [ -z "$dir" ] && [ -f "$LAST_FILE" ]; then
        dir="$(cat "$LAST_FILE")"
    fi
    [ -n "$dir" ] || { log "nothing to stop"; return 0; }
    if [ ! -f "$dir/state" ]; then
        log "no cluster state in $dir (already stopped?)"
        return 0
    fi
    case "$dir" in
        */pgpt-pg.*) ;;
        *) die "refusing to remove $dir: not a pg.sh directory" ;;
    esac
    bindir="$(state_get "$dir/state" BINDIR)"
    data="$(state_get "$dir/state" DATA)"
    pid="$(state_get "$dir/state" PID)"
    if ! as_owner "$bindir/pg_ctl" -D "$data" -m fast -w -t 30 stop >/dev/null 2>&1; then
        # pg_ctl gone or the server hung: stop the postmaster we started.
        if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
            kill -TERM "$pid" 2>/dev/null || true
            sleep 2
            kill -KILL "$pid" 2>/dev/null || true
        fi
    fi
    rm -rf "$dir"
    if [ -f "$LAST_FILE" ] && [ "$(cat "$LAST_FILE")" = "$dir" ]; then
        rm -f "$LAST_FILE"
    fi
    log "stopped and removed $dir"
}

case "${1:-}" in
    start) cmd_start ;;
    stop) shift; cmd_stop "${1:-}" ;;
    bindir) find_bindir || die "PostgreSQL server binaries not found" ;;
    *) echo "usage: $0 start | stop [DIR] | bindir" >&2; exit 2 ;;
esac
