#!/usr/bin/env bash
# Runs a command with a throwaway PostgreSQL 15 for the registry's PostgreSQL tests:
#   .ci/with-postgres.sh pytest -q tests/registry
# The server gets a free loopback port and a temporary data directory, both gone when the command
# ends; DELTASTORE_TEST_PG_URL names it. Used by `make test` (and so by .ci/run). An already set
# DELTASTORE_TEST_PG_URL is kept as it is. Without the binaries (or, as root, a postgres user) the
# command still runs and the PostgreSQL tests skip, saying why; this script says so first.
set -euo pipefail

if [ -n "${DELTASTORE_TEST_PG_URL:-}" ]; then
  echo "PostgreSQL for the registry tests: $DELTASTORE_TEST_PG_URL (from the environment)" >&2
  exec "$@"
fi

PG_BIN=${DELTASTORE_PG_BIN:-/usr/lib/postgresql/15/bin}
as_owner=()
why=""
if [ ! -x "$PG_BIN/initdb" ] || [ ! -x "$PG_BIN/pg_ctl" ]; then
  why="no PostgreSQL binaries in $PG_BIN (install postgresql-15 or set DELTASTORE_PG_BIN)"
elif [ "$(id -u)" -eq 0 ]; then
  if id postgres >/dev/null 2>&1; then
    as_owner=(runuser -u postgres --)  # initdb refuses to run as root
  else
    why="running as root and there is no postgres user to run PostgreSQL as"
  fi
fi
if [ -n "$why" ]; then
  echo "PostgreSQL not started: $why; the registry's PostgreSQL tests will be SKIPPED" >&2
  exec "$@"
fi

PG_DIR=$(mktemp -d /tmp/deltastore-pg.XXXXXX)
[ ${#as_owner[@]} -eq 0 ] || chown postgres "$PG_DIR"
PG_PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
stop_pg() {
  "${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m immediate stop >/dev/null 2>&1 || true
  rm -rf "$PG_DIR"
}
trap stop_pg EXIT
"${as_owner[@]}" "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust -E UTF8 >"$PG_DIR/initdb.log" 2>&1 \
  || { cat "$PG_DIR/initdb.log" >&2; exit 1; }
"${as_owner[@]}" "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$PG_DIR/log" -w \
  -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $PG_DIR -c fsync=off -c synchronous_commit=off -c full_page_writes=off -c max_connections=200" \
  start >/dev/null || { cat "$PG_DIR/log" >&2; exit 1; }
export DELTASTORE_TEST_PG_URL="postgresql+psycopg://postgres@127.0.0.1:$PG_PORT/postgres"
echo "PostgreSQL 15 for the registry tests on 127.0.0.1:$PG_PORT" >&2

# Not exec: the trap must stop the server when the command ends.
set +e
"$@"
rc=$?
exit "$rc"
