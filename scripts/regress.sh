#!/usr/bin/env bash
# `make regress`: PostgreSQL's own regression suite (src/test/regress, parallel_schedule)
# run twice against one throwaway PostgreSQL 15 cluster: directly, then through pgsilo in
# session mode.
#
#   1. installs what is missing (postgresql-server-dev-15, dpkg-dev; needs root then);
#   2. fetches the suite with `apt-get source` for the installed postgresql-15 version
#      (adding a deb-src entry when there is none) and keeps src/test/regress in
#      target/regress/pg-src/; builds regress.so from it with PGXS;
#   3. builds pgsilo, starts a cluster in a temp dir (as an unprivileged user when run as
#      root) and runs pg_regress against it: outputs in target/regress/direct/;
#   4. starts pgsilo (session mode) in front of it and runs the suite again through it:
#      outputs in target/regress/pgsilo/;
#   5. stops and removes everything it started, also on failure or Ctrl-C.
#
# Exit status: 0 when every test passed directly and every test that failed through
# pgsilo is listed, with its reason, in regress/expected_differences.txt; 1 otherwise;
# 2 when the suite could not be run at all.
# Environment: CARGO, CARGO_TARGET_DIR; PGSILO_REGRESS_USER (the user the cluster runs as
# when started as root; default postgres, else a system user pgsilo-regress is created).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
CARGO=${CARGO:-cargo}
BIN=$TARGET/debug/pgsilo
OUT=$ROOT/target/regress
SRC=$OUT/pg-src/src/test/regress
EXPECTED=$ROOT/regress/expected_differences.txt

PG_MAJOR=15
PG_BIN=/usr/lib/postgresql/$PG_MAJOR/bin
PG_LIB=/usr/lib/postgresql/$PG_MAJOR/lib
PG_CONFIG=$PG_BIN/pg_config
PG_REGRESS=$PG_LIB/pgxs/src/test/regress/pg_regress
DEB_SRC_LIST=/etc/apt/sources.list.d/pgsilo-deb-src.sources

say() { printf 'regress: %s\n' "$*" 2>/dev/null || true; }
die() { printf 'regress: %s\n' "$*" >&2 2>/dev/null || true; exit 2; }
# Output may go to a pipe that a Ctrl-C closes (`make regress | tee`): never die of
# SIGPIPE before cleaning up.
trap '' PIPE

is_root() { [ "$(id -u)" = 0 ]; }
have_pkg() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }

# --- prerequisites ----------------------------------------------------------------------

# The server headers build regress.so; dpkg-dev is what `apt-get source` relies on;
# pg_regress comes with postgresql-client-15. The headers and client are pinned to the
# installed server's version: unpinned, apt would upgrade the server along with them
# (and the suite fetched for it would then be a different one).
install_prerequisites() {
  local need=() version p
  for p in postgresql-$PG_MAJOR postgresql-client-$PG_MAJOR postgresql-server-dev-$PG_MAJOR dpkg-dev; do
    have_pkg "$p" || need+=("$p")
  done
  command -v cc >/dev/null 2>&1 || need+=(gcc)
  command -v make >/dev/null 2>&1 || need+=(make)
  [ ${#need[@]} -eq 0 ] && return 0
  is_root || die "missing packages: ${need[*]} (run as root, or: apt-get install ${need[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  if ! have_pkg "postgresql-$PG_MAJOR"; then
    say "installing postgresql-$PG_MAJOR"
    apt-get install -y -qq "postgresql-$PG_MAJOR" >/dev/null
  fi
  version=$(dpkg-query -W -f='${Version}' "postgresql-$PG_MAJOR")
  local pinned=()
  for p in "${need[@]}"; do
    case $p in
      "postgresql-$PG_MAJOR") ;;
      postgresql-*) pinned+=("$p=$version") ;;
      *) pinned+=("$p") ;;
    esac
  done
  [ ${#pinned[@]} -eq 0 ] && return 0
  say "installing ${pinned[*]}"
  apt-get install -y -qq "${pinned[@]}" >/dev/null
}

# --- the suite's source -----------------------------------------------------------------

# apt-get source needs deb-src lines; a stock Debian 12 has only `Types: deb`. Mirror
# every deb stanza of debian.sources (same URIs, suites, components, key) as deb-src.
add_deb_src() {
  local deb822=/etc/apt/sources.list.d/debian.sources
  if [ -f "$deb822" ]; then
    say "adding deb-src entries: $DEB_SRC_LIST (from $deb822)"
    sed -e '/^#/d' -e 's/^Types:.*/Types: deb-src/' "$deb822" >"$DEB_SRC_LIST.tmp"
  elif [ -f /etc/apt/sources.list ]; then
    say "adding deb-src entries: ${DEB_SRC_LIST%.sources}.list (from /etc/apt/sources.list)"
    DEB_SRC_LIST=${DEB_SRC_LIST%.sources}.list
    sed -n 's/^deb \(.*\)$/deb-src \1/p' /etc/apt/sources.list >"$DEB_SRC_LIST.tmp"
  else
    die "no apt sources found to derive a deb-src entry from"
  fi
  mv "$DEB_SRC_LIST.tmp" "$DEB_SRC_LIST"
}

# The installed version's source is known to apt (deb-src configured and indexed).
source_known() {
  apt-cache showsrc "postgresql-$PG_MAJOR" 2>/dev/null | grep -qxF "Version: $1"
}

# Fetches src/test/regress of exactly the installed postgresql-15 (the expected outputs
# must match the server) into target/regress/pg-src/, unless it is there already.
fetch_suite() {
  local version dl orig
  version=$(dpkg-query -W -f='${Version}' "postgresql-$PG_MAJOR")
  if [ -f "$SRC/parallel_schedule" ] && [ "$(cat "$OUT/pg-src/.version" 2>/dev/null)" = "$version" ]; then
    say "suite: reusing target/regress/pg-src (postgresql-$PG_MAJOR $version)"
    return 0
  fi
  is_root || die "the suite of postgresql-$PG_MAJOR $version is not in target/regress/pg-src; fetching it needs root (apt-get source)"
  if ! source_known "$version"; then
    [ -f "$DEB_SRC_LIST" ] || add_deb_src
    apt-get update -qq
    source_known "$version" || die "apt has no source for postgresql-$PG_MAJOR=$version (not in the deb-src indexes)"
  fi
  say "suite: apt-get source postgresql-$PG_MAJOR=$version"
  dl=$(mktemp -d "${TMPDIR:-/tmp}/pgsilo-regress-src.XXXXXX")
  # apt downloads as _apt (sandboxed) when _apt may write the folder; else it warns.
  if id -u _apt >/dev/null 2>&1; then chown _apt "$dl"; fi
  (cd "$dl" && apt-get source --download-only -qq "postgresql-$PG_MAJOR=$version") \
    || { rm -rf "$dl"; die "apt-get source postgresql-$PG_MAJOR=$version failed"; }
  local tarballs=("$dl"/postgresql-"$PG_MAJOR"_*.orig.tar.*)
  orig=${tarballs[0]}
  [ -f "$orig" ] || { rm -rf "$dl"; die "apt-get source postgresql-$PG_MAJOR=$version fetched no orig tarball"; }
  rm -rf "$OUT/pg-src" "$OUT/pg-src.tmp"
  mkdir -p "$OUT/pg-src.tmp"
  tar -xf "$orig" -C "$OUT/pg-src.tmp" --strip-components=1 --wildcards "postgresql-$PG_MAJOR.*/src/test/regress"
  rm -rf "$dl"
  [ -f "$OUT/pg-src.tmp/src/test/regress/parallel_schedule" ] || die "$orig has no src/test/regress/parallel_schedule"
  echo "$version" >"$OUT/pg-src.tmp/.version"
  mv "$OUT/pg-src.tmp" "$OUT/pg-src"
}

# regress.so (C functions the tests call) is not packaged: build it from the suite's
# regress.c with PGXS against the installed server headers. with_llvm=no: no JIT bitcode,
# so clang is not needed.
build_regress_so() {
  local b=$OUT/build
  mkdir -p "$b"
  cp -p "$SRC/regress.c" "$b/regress.c"
  cat >"$b/Makefile" <<MAKE
# Written by scripts/regress.sh: regress.so from the suite's regress.c, with PGXS.
MODULES = regress
PG_CONFIG = $PG_CONFIG
PGXS := \$(shell \$(PG_CONFIG) --pgxs)
include \$(PGXS)
MAKE
  make -s -C "$b" with_llvm=no >"$b/build.log" 2>&1 || { cat "$b/build.log"; die "building regress.so failed"; }
  cp "$b/regress.so" "$OUT/regress.so"
  say "built target/regress/regress.so"
}

# --- the cluster ------------------------------------------------------------------------

RUN_USER=
WORK=
PGPORT=
PGSILO_PORT=
pgsilo_pid=
cluster_started=0

# PostgreSQL refuses to run as root: pick the user to run the cluster (and pg_regress,
# whose output folder the server writes into) as, creating a system user if need be.
pick_run_user() {
  if ! is_root; then RUN_USER=$(id -un); return 0; fi
  RUN_USER=${PGSILO_REGRESS_USER:-}
  if [ -z "$RUN_USER" ]; then
    if id -u postgres >/dev/null 2>&1; then RUN_USER=postgres; else RUN_USER=pgsilo-regress; fi
  fi
  if ! id -u "$RUN_USER" >/dev/null 2>&1; then
    say "creating system user $RUN_USER"
    useradd --system --user-group --home-dir /nonexistent --no-create-home \
      --shell /usr/sbin/nologin --comment 'pgsilo make regress' "$RUN_USER"
  fi
}

# Runs a command as RUN_USER (unchanged when not root), with HOME in the work folder so
# nothing reads root's dotfiles.
as_user() {
  if is_root; then
    setpriv --reuid="$RUN_USER" --regid="$(id -g "$RUN_USER")" --clear-groups -- \
      env HOME="$WORK" "$@"
  else
    env HOME="$WORK" "$@"
  fi
}

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# A port below the ephemeral range that nothing listens on; if something takes it before
# we bind, PostgreSQL or pgsilo fails to start and says so.
free_port() {
  local port _
  for _ in $(seq 1 100); do
    port=$((20000 + RANDOM % 12000))
    [ "$port" != "${PGPORT:-}" ] || continue
    port_busy "$port" || { echo "$port"; return 0; }
  done
  die "found no free port on 127.0.0.1"
}

wait_port() {
  local _
  for _ in $(seq 1 100); do port_busy "$1" && return 0; sleep 0.1; done
  return 1
}

# Everything lives in one temp folder owned by RUN_USER: the data directory and socket,
# the library folder (--dlpath) and a copy of the suite (the server reads its data files
# by path with COPY FROM, and writes into the output folder with COPY TO, so both must be
# reachable by it whatever the permissions of the repository's path).
make_workdir() {
  WORK=$(mktemp -d "${TMPDIR:-/tmp}/pgsilo-regress.XXXXXX")
  mkdir -p "$WORK/sock" "$WORK/lib" "$WORK/out" "$WORK/pgsilo"
  cp -r "$SRC" "$WORK/suite"
  # The tests load regress, autoinc and refint from one folder (psql variable libdir,
  # from pg_regress --dlpath); the latter two come with postgresql-15.
  cp "$OUT/regress.so" "$PG_LIB/autoinc.so" "$PG_LIB/refint.so" "$WORK/lib/"
  if is_root; then chown -R "$RUN_USER:$(id -g "$RUN_USER")" "$WORK"; fi
}

start_cluster() {
  PGPORT=$(free_port)
  as_user "$PG_BIN/initdb" -D "$WORK/data" -U postgres --auth=trust --no-sync \
    -E UTF8 --no-locale >"$WORK/initdb.log" 2>&1 || { cat "$WORK/initdb.log"; die "initdb failed"; }
  # The last lines are what pg_regress writes for its own temp instance (the suite expects
  # max_prepared_transactions > 0, for one).
  cat >>"$WORK/data/postgresql.conf" <<CONF

# Added by pgsilo scripts/regress.sh
listen_addresses = '127.0.0.1'
port = $PGPORT
unix_socket_directories = '$WORK/sock'
fsync = off
synchronous_commit = off
full_page_writes = off
max_connections = 150
log_autovacuum_min_duration = 0
log_checkpoints = on
log_line_prefix = '%m %b[%p] %q%a '
log_lock_waits = on
log_temp_files = 128kB
max_prepared_transactions = 2
CONF
  cluster_started=1
  as_user "$PG_BIN/pg_ctl" -D "$WORK/data" -l "$WORK/postgres.log" -w -t 60 start >/dev/null \
    || { tail -n 20 "$WORK/postgres.log"; die "PostgreSQL did not start"; }
  say "PostgreSQL $("$PG_BIN/postgres" --version | awk '{print $3}') on 127.0.0.1:$PGPORT (as $RUN_USER, data in $WORK/data)"
}

# pg_regress --use-existing does not create the database: do what it would (same
# statements as its create_database()), afresh for each run.
recreate_database() {
  as_user "$PG_BIN/psql" -X -q -h "$WORK/sock" -p "$PGPORT" -U postgres -d postgres -v ON_ERROR_STOP=1 <<'SQL' >/dev/null
SET client_min_messages = warning;
DROP DATABASE IF EXISTS regression WITH (FORCE);
CREATE DATABASE regression TEMPLATE=template0;
ALTER DATABASE regression SET lc_messages TO 'C';
ALTER DATABASE regression SET lc_monetary TO 'C';
ALTER DATABASE regression SET lc_numeric TO 'C';
ALTER DATABASE regression SET lc_time TO 'C';
ALTER DATABASE regression SET bytea_output TO 'hex';
ALTER DATABASE regression SET timezone_abbreviations TO 'Default';
SQL
}

# --- pgsilo -----------------------------------------------------------------------------

build_pgsilo() {
  say "building pgsilo ($CARGO build --bin pgsilo)"
  (cd "$ROOT" && "$CARGO" build --quiet --bin pgsilo) || die "cargo build --bin pgsilo failed"
  [ -x "$BIN" ] || die "no binary at $BIN after cargo build"
}

# Session mode in front of the cluster. The suite connects only as postgres, to
# regression (pg_regress, and every \c in the tests) and postgres; trust still needs the
# user in the auth_file. The pool is wider than the widest parallel group (20 tests).
start_pgsilo() {
  PGSILO_PORT=$(free_port)
  local dir=$WORK/pgsilo db
  printf '"postgres" "unused-with-trust"\n' >"$dir/userlist.txt"
  {
    cat <<TOML
[pgsilo]
name = "regress"
listen_addr = "127.0.0.1"
listen_port = $PGSILO_PORT
auth_type = "trust"
auth_file = "userlist.txt"
pool_mode = "session"
max_client_conn = 200
default_pool_size = 30
server_login_retry = 1
server_connect_timeout = 5
query_wait_timeout = 30
client_login_timeout = 10
shutdown_timeout = 5
takeover_socket = ""
TOML
    for db in regression postgres; do
      printf '\n[databases.%s]\nhost = "127.0.0.1"\nport = %s\n' "$db" "$PGPORT"
    done
  } >"$dir/pgsilo.toml"
  "$BIN" --check "$dir/pgsilo.toml" >"$dir/check.log" 2>&1 || { cat "$dir/check.log"; die "pgsilo --check rejected $dir/pgsilo.toml"; }
  # A session of its own: a Ctrl-C in the terminal reaches this script, which stops
  # pgsilo itself, before PostgreSQL.
  setsid "$BIN" "$dir/pgsilo.toml" >"$WORK/pgsilo.log" 2>&1 </dev/null &
  pgsilo_pid=$!
  wait_port "$PGSILO_PORT" || { cat "$WORK/pgsilo.log"; die "pgsilo did not start"; }
  say "pgsilo pid $pgsilo_pid on 127.0.0.1:$PGSILO_PORT (session mode)"
}

stop_pgsilo() {
  [ -n "$pgsilo_pid" ] || return 0
  if kill -0 "$pgsilo_pid" 2>/dev/null; then
    kill -TERM "$pgsilo_pid" 2>/dev/null || true
    local _
    for _ in $(seq 1 70); do kill -0 "$pgsilo_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pgsilo_pid" 2>/dev/null || true
  fi
  wait "$pgsilo_pid" 2>/dev/null || true
  pgsilo_pid=
}

cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pgsilo
  if [ "$cluster_started" = 1 ]; then
    as_user "$PG_BIN/pg_ctl" -D "$WORK/data" -m immediate -w stop >/dev/null 2>&1 || true
  fi
  if [ -n "$WORK" ] && [ -d "$WORK" ]; then
    # The servers' logs stay with the results; the rest goes.
    cp "$WORK/postgres.log" "$OUT/postgres.log" 2>/dev/null || true
    cp "$WORK/pgsilo.log" "$OUT/pgsilo.log" 2>/dev/null || true
    rm -rf "$WORK"
  fi
  exit "$rc"
}

# --- running the suite ------------------------------------------------------------------

# Per run, from pg_regress's own output: how many tests ran, which failed, which failed
# but are marked `ignore:` in the schedule (pg_regress does not count those as failures).
declare -A TOTAL=() FAILED=() IGNORED=() SECONDS_TAKEN=()

# run_suite NAME PORT: pg_regress against 127.0.0.1:PORT, outputs in target/regress/NAME/.
run_suite() {
  local name=$1 port=$2 out=$WORK/out/$1 log started rc=0
  log=$out/pg_regress.log
  as_user mkdir -p "$out"
  started=$(date +%s)
  as_user "$PG_REGRESS" --use-existing --host 127.0.0.1 --port "$port" --user postgres \
    --dbname regression --no-locale --bindir "$PG_BIN" --dlpath "$WORK/lib" \
    --inputdir "$WORK/suite" --outputdir "$out" \
    --schedule "$WORK/suite/parallel_schedule" --max-concurrent-tests 20 2>&1 \
    | sed -u "s/^/[$name] /" | tee "$log" || rc=$?
  SECONDS_TAKEN[$name]=$(($(date +%s) - started))
  # Test lines look like "test tablespace  ... ok  512 ms" (alone) or
  # "     boolean  ... FAILED  40 ms" (in a parallel group).
  TOTAL[$name]=$(grep -cE '^\[[a-z]+\] +(test +)?[^ ]+ +\.\.\. ' "$log" || true)
  FAILED[$name]=$(sed -nE 's/^\[[a-z]+\] +(test +)?([^ ]+) +\.\.\. +FAILED.*/\2/p' "$log" | paste -sd' ' -)
  IGNORED[$name]=$(sed -nE 's/^\[[a-z]+\] +(test +)?([^ ]+) +\.\.\. +failed \(ignored\).*/\2/p' "$log" | paste -sd' ' -)
  rm -rf "${OUT:?}/$name"
  cp -r "$out" "$OUT/$name"
  # The diff headers name files in the temp folder, which goes: name the kept copies.
  if [ -f "$OUT/$name/regression.diffs" ]; then
    sed -i -e "s|$out/|target/regress/$name/|g" -e "s|$WORK/suite/|target/regress/pg-src/src/test/regress/|g" \
      "$OUT/$name/regression.diffs"
  fi
  [ "${TOTAL[$name]}" -gt 0 ] || die "pg_regress ($name) ran no tests (exit $rc); see target/regress/$name/pg_regress.log"
  if [ "$rc" != 0 ] && [ -z "${FAILED[$name]}" ]; then
    die "pg_regress ($name) exited $rc without a failed test; see target/regress/$name/pg_regress.log"
  fi
}

# Names listed in regress/expected_differences.txt (`name  reason`, # comments); a name
# without a reason is an error: the file exists to say why.
read_expected() {
  [ -f "$EXPECTED" ] || return 0
  local line name reason n=0
  while IFS= read -r line || [ -n "$line" ]; do
    n=$((n + 1))
    line=${line%%#*}
    read -r name reason <<<"$line" || true
    [ -n "${name:-}" ] || continue
    [ -n "${reason:-}" ] || die "regress/expected_differences.txt line $n: \"$name\" has no reason"
    printf '%s\n' "$name"
  done <"$EXPECTED"
}

duration() { printf '%dm%02ds' $(($1 / 60)) $(($1 % 60)); }
count() { wc -w <<<"$1"; }
# "a, b, c" from the arguments, or "none".
join() {
  local IFS=, all
  all="$*"
  all=${all:-none}
  echo "${all//,/, }"
}

# "N of M passed (time)" for one run, noting failures the schedule ignores.
run_line() {
  local name=$1 passed
  passed=$((TOTAL[$name] - $(count "${FAILED[$name]}") - $(count "${IGNORED[$name]}")))
  printf '%s of %s passed' "$passed" "${TOTAL[$name]}"
  [ -z "${IGNORED[$name]}" ] || printf ' (failed but ignored by the schedule: %s)' "${IGNORED[$name]}"
  printf ' (%s)' "$(duration "${SECONDS_TAKEN[$name]}")"
}

# Prints the summary; returns 1 when a test failed directly or an unlisted one through pgsilo.
report() {
  local expected unexpected=() tolerated=() passed_anyway=() t status=0
  expected=" $(read_expected | paste -sd' ' -) "
  for t in ${FAILED[pgsilo]}; do
    case "$expected" in *" $t "*) tolerated+=("$t") ;; *) unexpected+=("$t") ;; esac
  done
  for t in $expected; do
    case " ${FAILED[pgsilo]} " in *" $t "*) ;; *) passed_anyway+=("$t") ;; esac
  done
  echo
  say "direct: $(run_line direct)"
  say "pgsilo (session mode): $(run_line pgsilo); expected differences: $(join "${tolerated[@]}")"
  if [ -n "${FAILED[direct]}" ]; then
    say "FAILED directly: ${FAILED[direct]}; see target/regress/direct/regression.diffs"
    status=1
  fi
  if [ ${#unexpected[@]} -gt 0 ]; then
    say "FAILED through pgsilo and not in regress/expected_differences.txt: ${unexpected[*]}"
    status=1
  fi
  if [ ${#passed_anyway[@]} -gt 0 ]; then
    say "listed in regress/expected_differences.txt but passed: ${passed_anyway[*]}"
  fi
  if [ -n "${FAILED[pgsilo]}" ]; then
    say "differences through pgsilo: target/regress/pgsilo/regression.diffs"
  fi
  say "logs: target/regress/postgres.log, target/regress/pgsilo.log"
  return $status
}

main() {
  install_prerequisites
  mkdir -p "$OUT"
  fetch_suite
  build_regress_so
  # Before the first run, so a build error ends this in seconds, not after the suite.
  build_pgsilo
  pick_run_user
  trap cleanup EXIT
  trap 'say "interrupted"; exit 130' INT
  trap 'say "terminated"; exit 143' TERM
  make_workdir
  start_cluster

  recreate_database
  say "running the suite directly against PostgreSQL"
  run_suite direct "$PGPORT"

  recreate_database
  start_pgsilo
  say "running the suite through pgsilo"
  run_suite pgsilo "$PGSILO_PORT"
  stop_pgsilo

  report
}

main "$@"
