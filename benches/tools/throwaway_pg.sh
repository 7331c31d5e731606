# Sourced by the bench scripts. `throwaway_pg W PORT [postgresql.conf lines...]`: a
# PostgreSQL 15 cluster run by postgres in the fresh folder W (made postgres's), trust
# auth, fsync off, listening on 127.0.0.1:PORT and a Unix socket in W, started in a
# session of its own. At exit, the processes whose pid files are in W are killed, the
# cluster stopped and W removed. Run as root.
BIN=${BIN:-/usr/lib/postgresql/15/bin}

throwaway_pg() {
  local dir=$1 port=$2
  shift 2
  chown postgres "$dir"
  # shellcheck disable=SC2064 # the folder is fixed now
  trap "throwaway_pg_cleanup '$dir'" EXIT
  su postgres -c "$BIN/initdb -D $dir/data -U postgres --auth=trust" >/dev/null
  {
    echo "port = $port"
    echo "listen_addresses = '127.0.0.1'"
    echo "unix_socket_directories = '$dir'"
    echo "fsync = off"
    printf '%s\n' "$@"
  } >>"$dir/data/postgresql.conf"
  su postgres -c "setsid -w $BIN/pg_ctl -D $dir/data -l $dir/pg.log -w start" >/dev/null || {
    cat "$dir/pg.log" >&2
    exit 1
  }
}

throwaway_pg_cleanup() {
  local f
  for f in "$1"/*.pid; do
    [ -f "$f" ] && kill "$(cat "$f")" 2>/dev/null || true
  done
  su postgres -c "$BIN/pg_ctl -D $1/data -m immediate stop" >/dev/null 2>&1 || true
  rm -rf "$1"
}
