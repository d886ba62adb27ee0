#!/usr/bin/env bash
# A throw-away PostgreSQL cluster for tests: `scripts/postgres.sh start DIR` creates one in DIR
# (initdb, trust auth for local connections only, 127.0.0.1 on a free port + a Unix socket in
# DIR), starts it and prints its SQLAlchemy URL (also written to DIR/url);
# `scripts/postgres.sh stop DIR` stops it (then delete DIR).
# Installs the Debian package `postgresql` with apt-get when no PostgreSQL binaries are found
# (set SOUVERAIN_PG_NO_INSTALL=1 to fail instead). As root, the cluster runs as the `postgres`
# OS user (PostgreSQL refuses to run as root).
set -euo pipefail

cmd=${1:-}
dir=${2:-}
if [ -z "$cmd" ] || [ -z "$dir" ]; then
  echo "usage: $0 start|stop DIR" >&2
  exit 2
fi

find_bindir() {
  if command -v pg_config >/dev/null 2>&1 && [ -x "$(pg_config --bindir)/initdb" ]; then
    pg_config --bindir; return 0
  fi
  local d
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
    if [ -x "$d/initdb" ]; then echo "$d"; return 0; fi
  done
  if command -v initdb >/dev/null 2>&1; then dirname "$(command -v initdb)"; return 0; fi
  return 1
}

bindir=$(find_bindir) || bindir=""
if [ -z "$bindir" ]; then
  if [ "${SOUVERAIN_PG_NO_INSTALL:-0}" = "1" ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "PostgreSQL binaries (initdb, pg_ctl) not found; install the postgresql package." >&2
    exit 3
  fi
  sudo=""
  [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq >&2
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >&2
  bindir=$(find_bindir) || { echo "postgresql installed but initdb not found" >&2; exit 3; }
fi

as_owner() {  # run a PostgreSQL binary as the cluster's owner
  if [ "$(id -u)" -eq 0 ]; then
    if command -v runuser >/dev/null 2>&1; then
      runuser -u postgres -- "$@"
    else
      su postgres -s /bin/sh -c "$(printf '%q ' "$@")"
    fi
  else
    "$@"
  fi
}

case "$cmd" in
  start)
    mkdir -p "$dir"
    dir=$(cd "$dir" && pwd)
    cluster="$dir"
    if [ "$(id -u)" -eq 0 ]; then
      # the postgres user may not traverse DIR's parents (pytest's tmp dirs are 0700)
      cluster=$(mktemp -d /tmp/souverain-pg.XXXXXX)
      chown postgres "$cluster"
    fi
    echo "$cluster" > "$dir/cluster"
    port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
    as_owner "$bindir/initdb" -D "$cluster/data" -U souverain -A trust -E UTF8 --no-sync \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; exit 1; }
    as_owner "$bindir/pg_ctl" -D "$cluster/data" -l "$cluster/server.log" -w -t 60 start \
      -o "-c listen_addresses=127.0.0.1 -p $port -k $cluster -c fsync=off -c full_page_writes=off" \
      >/dev/null || { cat "$cluster/server.log" >&2; exit 1; }
    url="postgresql+psycopg://souverain@127.0.0.1:$port/postgres"
    echo "$url" > "$dir/url"
    echo "$url"
    ;;
  stop)
    cluster=$(cat "$dir/cluster" 2>/dev/null || echo "$dir")
    if [ -d "$cluster/data" ]; then
      as_owner "$bindir/pg_ctl" -D "$cluster/data" -m immediate -w stop >/dev/null 2>&1 || true
    fi
    if [ "$cluster" != "$dir" ]; then rm -rf "$cluster"; fi
    ;;
  *)
    echo "usage: $0 start|stop DIR" >&2
    exit 2
    ;;
esac
