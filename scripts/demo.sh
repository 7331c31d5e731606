#!/usr/bin/env bash
# `make demo`: does one pgsilo process per tenant keep a noisy neighbour away from its
# victim, where one shared process does not?
#
#   1. a throwaway PostgreSQL on 127.0.0.1:54320 and the two tenants from config/
#      (tenant A on 6432, core 0; tenant B on 6433, core 1), via scripts/dev.sh;
#   2. one shared pgsilo serving both tenants (config/shared.toml, 6434, cores 0 and 1);
#   3. pgsilo-loadtest compare: tenant B is the victim (500 queries/s, open loop) and
#      tenant A the aggressor (fills its max_client_conn with pg_sleep clients and holds
#      its pool with idle transactions), first on the dedicated pair, then on the shared
#      instance; tables and verdicts printed, report files in target/demo/;
#   4. max_busy_cores: tenant A's `throughput` aggressor (closed-loop SELECT 1) against
#      the victim, from tenant A as configured, then from a copy of it with a budget of
#      server busy time (6435, core 0), phases of DEMO_BUDGET_DURATION; verdicts printed,
#      reports in target/demo/budget-*/. DEMO_BUDGET=0 skips it;
#   5. everything it started is stopped on exit, failure or Ctrl-C.
#
# Environment: DEMO_DURATION (each phase, default 8s: about a minute in all),
# DEMO_SCENARIO (scenario file), DEMO_OUT (report folder), DEMO_BUDGET (max_busy_cores of
# step 4, default 0.25; 0 skips it), DEMO_BUDGET_DURATION (default 4s: about 30 s more),
# CARGO_TARGET_DIR.
# Exit status: 0 when the comparison ran and the dedicated victim saw no errors (the
# shared setup failing the check is the expected finding, not a failure); else non-zero.
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
case "$TARGET" in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
BIN=$TARGET/release/pgsilo
LOADTEST=$TARGET/release/pgsilo-loadtest
OUT=${DEMO_OUT:-$ROOT/target/demo}
DURATION=${DEMO_DURATION:-8s}
SCENARIO=${DEMO_SCENARIO:-$ROOT/loadtest/scenarios/noisy_neighbour.toml}
# The demo's own playground, apart from a `make up` one (same ports, so not both at once).
export PGSILO_DEV_DIR=${PGSILO_DEV_DIR:-$TARGET/demo-env}
export PGSILO_BIN=$BIN
DEV=$PGSILO_DEV_DIR
SHARED_PORT=6434
BUDGET_PORT=6435
BUDGET=${DEMO_BUDGET:-0.25}
BUDGET_DURATION=${DEMO_BUDGET_DURATION:-4s}

say() { printf 'demo: %s\n' "$*" 2>/dev/null || true; }
die() { printf 'demo: %s\n' "$*" >&2 2>/dev/null || true; exit 2; }
# Output may go to a pipe that a Ctrl-C closes (`make demo | tee`): never die of SIGPIPE
# before cleaning up.
trap '' PIPE

[ -x "$BIN" ] || die "$BIN is missing: run make build (make demo does)"
[ -x "$LOADTEST" ] || die "$LOADTEST is missing: run make build (make demo does)"

port_busy() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
for port in 54320 6432 6433 $SHARED_PORT $BUDGET_PORT; do
  if port_busy "$port"; then
    die "127.0.0.1:$port is already in use (a \`make up\` playground? stop it with \`make down\`)"
  fi
done

started_env=0
shared_pid=
budget_pid=
stop_pid() {
  local pid=$1
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill -INT "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$pid" 2>/dev/null || true
  fi
}
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  stop_pid "$shared_pid"
  stop_pid "$budget_pid"

  if [ "$started_env" = 1 ]; then
    # Keep the servers' logs with the report: dev.sh down removes its folder.
    mkdir -p "$OUT/logs" && cp "$DEV"/*.log "$OUT/logs/" 2>/dev/null || true
    "$ROOT/scripts/dev.sh" down >/dev/null 2>&1 || true
    say "stopped PostgreSQL and the pgsilo instances"
  fi
  exit "$rc"
}
trap cleanup EXIT
trap 'say "interrupted"; exit 130' INT TERM

started=$(date +%s)
say "starting PostgreSQL and the two tenants (scripts/dev.sh up, in $DEV)"
started_env=1
"$ROOT/scripts/dev.sh" up
"$BIN" --check "$ROOT/config/shared.toml" >/dev/null || die "config/shared.toml is invalid"
nohup "$BIN" "$ROOT/config/shared.toml" >"$DEV/shared.log" 2>&1 &
shared_pid=$!
echo "$shared_pid" >"$DEV/shared.pid"
for _ in $(seq 1 100); do port_busy $SHARED_PORT && break; sleep 0.1; done
port_busy $SHARED_PORT || { cat "$DEV/shared.log"; die "the shared pgsilo did not start"; }
say "shared: pgsilo pid $shared_pid on 127.0.0.1:$SHARED_PORT (log $DEV/shared.log)"
"$ROOT/scripts/dev.sh" status

# The machine may be busy with unrelated work (builds, other jobs). Give the systems under
# test, PostgreSQL and the three pgsilo processes, the same higher priority so that such
# work disturbs the measurement less; it changes nothing between the two setups. The
# aggressor runs inside pgsilo-loadtest at normal priority.
pids=("$shared_pid")
for t in tenant_a tenant_b; do pids+=("$(cat "$DEV/$t.pid")"); done
if [ -f "$DEV/pg/postmaster.pid" ]; then
  pm=$(head -n1 "$DEV/pg/postmaster.pid")
  pids+=("$pm")
  while read -r child; do pids+=("$child"); done < <(pgrep -P "$pm" || true)
fi
if renice -n -10 -p "${pids[@]}" >/dev/null 2>&1; then
  say "PostgreSQL and pgsilo run at nice -10 (new PostgreSQL backends inherit it)"
else
  say "could not raise PostgreSQL's and pgsilo's priority (not root?): background load may add noise"
fi

victim_b="host=127.0.0.1 user=user_b password=pass_b dbname=tenant_b_db"
aggressor_a="host=127.0.0.1 user=user_a password=pass_a dbname=tenant_a_db"
rm -rf "$OUT"
mkdir -p "$OUT"
say "measuring: victim tenant B, aggressor tenant A; $DURATION per phase, dedicated then shared"
set +e
"$LOADTEST" compare \
  --scenario "$SCENARIO" \
  --duration "$DURATION" \
  --dedicated-victim "$victim_b port=6433" \
  --dedicated-aggressor "$aggressor_a port=6432" \
  --shared-victim "$victim_b port=$SHARED_PORT" \
  --shared-aggressor "$aggressor_a port=$SHARED_PORT" \
  --avoid-cores 0,1 \
  --ratio-check report \
  --out "$OUT"
rc=$?
set -e

# Step 4: the same tenant A with a budget of server busy time, against the throughput
# aggressor. Informational: it does not change the exit status.
if [ "$BUDGET" != 0 ] && [ "$rc" -le 1 ]; then
  sed -e "s/^listen_port *=.*/listen_port = $BUDGET_PORT/" \
      -e 's/^name *=.*/name = "tenant_a_budget"/' \
      -e "s|^auth_file *=.*|auth_file = \"$ROOT/config/userlist_tenant_a.txt\"|" \
      -e "s/^default_pool_size *=.*/&\nmax_busy_cores = $BUDGET/" \
      "$ROOT/config/tenant_a.toml" >"$DEV/tenant_a_budget.toml"
  "$BIN" --check "$DEV/tenant_a_budget.toml" >/dev/null || die "$DEV/tenant_a_budget.toml is invalid"
  nohup "$BIN" "$DEV/tenant_a_budget.toml" >"$DEV/tenant_a_budget.log" 2>&1 &
  budget_pid=$!
  for _ in $(seq 1 100); do port_busy $BUDGET_PORT && break; sleep 0.1; done
  port_busy $BUDGET_PORT || { cat "$DEV/tenant_a_budget.log"; die "tenant A with a budget did not start"; }
  renice -n -10 -p "$budget_pid" >/dev/null 2>&1 || true
  echo
  say "max_busy_cores: tenant A's throughput aggressor without, then with max_busy_cores = $BUDGET; $BUDGET_DURATION per phase"
  for setup in "off 6432 no budget" "on $BUDGET_PORT max_busy_cores=$BUDGET"; do
    read -r tag port label <<<"$setup"
    set +e
    "$LOADTEST" run \
      --scenario "$SCENARIO" \
      --duration "$BUDGET_DURATION" \
      --aggressors throughput \
      --victim "$victim_b port=6433" \
      --aggressor "$aggressor_a port=$port" \
      --avoid-cores 0,1 \
      --label "throughput, $label" \
      --out "$OUT/budget-$tag" >"$OUT/budget-$tag.txt" 2>&1
    brc=$?
    set -e
    if [ "$brc" -le 1 ]; then
      grep -h '^VERDICT' "$OUT/budget-$tag.txt" || true
      # The aggressor's own rate: what the budget held back.
      grep -h -m1 '^  throughput ' "$OUT/budget-$tag.txt" | sed 's/^ */  aggressor /' || true
    else
      say "the run [$label] could not be made (exit $brc): $OUT/budget-$tag.txt"
    fi
  done
  stop_pid "$budget_pid"
  budget_pid=
fi
elapsed=$(( $(date +%s) - started ))
echo
case $rc in
  0) say "done in ${elapsed}s. Report: $OUT/comparison.txt, chart: $OUT/comparison.svg (per setup: $OUT/dedicated/, $OUT/shared/)" ;;
  1) say "the DEDICATED victim saw errors: isolation broke where it must hold (report in $OUT)" ;;
  *) say "the measurement could not be made (exit $rc); server logs will be in $OUT/logs" ;;
esac
exit $rc
