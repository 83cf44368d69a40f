#!/bin/bash
# conductor postgres sidecar entrypoint.
# First start (PGDATA empty): initdb with superuser $POSTGRES_USER (default postgres) whose
# password is $POSTGRES_PASSWORD (default postgres), trust for local socket connections, md5
# for TCP from anywhere, listen on all addresses, create database $POSTGRES_DB (default
# postgres), run /docker-entrypoint-initdb.d/*.sql|*.sh. Then exec postgres in the foreground.
# Arguments are passed to postgres (a leading "postgres" is dropped, as with the Docker image).
set -euo pipefail

PG_BIN="/usr/lib/postgresql/${PG_MAJOR:-15}/bin"
export PGDATA="${PGDATA:-/var/lib/postgresql/data}"
POSTGRES_USER="${POSTGRES_USER:-postgres}"
POSTGRES_PASSWORD="${POSTGRES_PASSWORD:-postgres}"
POSTGRES_DB="${POSTGRES_DB:-postgres}"

if [ "${1:-}" = postgres ]; then shift; fi

# Started as root (e.g. --user 0 or a root-owned volume): fix ownership, then drop privileges.
if [ "$(id -u)" = 0 ]; then
    mkdir -p "$PGDATA" /run/postgresql
    chown postgres:postgres "$PGDATA" /run/postgresql
    chmod 700 "$PGDATA"
    exec setpriv --reuid=postgres --regid=postgres --init-groups "$0" "$@"
fi

mkdir -p "$PGDATA"
chmod 700 "$PGDATA" 2>/dev/null || true
sockdir=/run/postgresql
[ -w "$sockdir" ] || sockdir=/tmp

if [ -z "$(ls -A "$PGDATA" 2>/dev/null)" ]; then
    echo "postgres-entrypoint: initialising $PGDATA"
    pwfile="$(mktemp)"
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    "$PG_BIN/initdb" -D "$PGDATA" -U "$POSTGRES_USER" --pwfile="$pwfile" \
        --auth-local=trust --auth-host=md5 -E UTF8 --locale=C.UTF-8 >/dev/null
    rm -f "$pwfile"
    {
        echo
        echo "# conductor: password login over TCP from anywhere"
        echo "host all all 0.0.0.0/0 md5"
        echo "host all all ::/0 md5"
    } >> "$PGDATA/pg_hba.conf"
    {
        echo
        echo "# conductor"
        echo "listen_addresses = '*'"
        echo "port = 5432"
        echo "unix_socket_directories = '$sockdir'"
    } >> "$PGDATA/postgresql.conf"

    # Temporary server on the socket only, to create the database and run init scripts.
    "$PG_BIN/pg_ctl" -D "$PGDATA" -o "-c listen_addresses='' -k $sockdir" -w -s start
    psql=(psql -h "$sockdir" -U "$POSTGRES_USER" -v ON_ERROR_STOP=1 --no-psqlrc -q)
    if [ "$POSTGRES_DB" != postgres ]; then
        "${psql[@]}" -d postgres -v db="$POSTGRES_DB" <<<'CREATE DATABASE :"db";'
    fi
    for f in /docker-entrypoint-initdb.d/*; do
        case "$f" in
            *.sql) echo "postgres-entrypoint: running $f"; "${psql[@]}" -d "$POSTGRES_DB" -f "$f" ;;
            *.sh)  echo "postgres-entrypoint: running $f"; . "$f" ;;
        esac
    done
    "$PG_BIN/pg_ctl" -D "$PGDATA" -m fast -w -s stop
    echo "postgres-entrypoint: init done"
fi

exec "$PG_BIN/postgres" -D "$PGDATA" -k "$sockdir" "$@"
